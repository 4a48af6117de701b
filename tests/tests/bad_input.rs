//! Bad input against a running server, with genuine quotes from a real
//! swtpm: every case gets a clear 4xx with a stable code, is audited as a
//! failed attestation where the host is known, never leaves the host
//! trusted, and leaves the server serving (a genuine quote afterwards is
//! trusted again).

use attestation_server::config::ServerConfig;
use base64::Engine;
use e2e_tests::{attestations, Pool};
use host_agent::tpm::Tpm;
use host_agent::AkType;
use proto::client::{ApiClient, ClientError};
use proto::wire::{Challenge, Evidence, HostTrust, Trust};
use proto::HashAlg;
use std::time::Duration;
use test_support::SwTpm;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

struct Host {
    api: ApiClient,
    tpm: Tpm,
}

impl Host {
    async fn challenge(&self) -> Challenge {
        self.api
            .post("/v1/agents/node1/challenge", &serde_json::json!({}))
            .await
            .expect("challenge")
    }

    /// A genuine quote answering `ch`, optionally over another selection.
    async fn evidence(
        &self,
        ch: &Challenge,
        selection: Option<&proto::wire::PcrSelectionMap>,
    ) -> Evidence {
        let nonce = hex::decode(&ch.nonce).expect("hex nonce");
        let q = self
            .tpm
            .quote(&nonce, selection.unwrap_or(&ch.pcr_selection))
            .await
            .expect("quote");
        Evidence {
            nonce: ch.nonce.clone(),
            attest: B64.encode(&q.attest),
            signature: B64.encode(&q.signature),
            pcrs: q.pcrs,
            uefi_log: None,
            ima: None,
        }
    }

    async fn submit(&self, ev: &Evidence) -> Result<HostTrust, ClientError> {
        self.api.post("/v1/agents/node1/evidence", ev).await
    }

    /// A fresh, genuine round: must be trusted.
    async fn genuine_round(&self) {
        let ch = self.challenge().await;
        let v = self
            .submit(&self.evidence(&ch, None).await)
            .await
            .expect("genuine evidence");
        assert_eq!(v.trust, Trust::Trusted, "{v:?}");
    }
}

fn expect_code(result: Result<HostTrust, ClientError>, status: u16, code: &str) {
    match result {
        Err(ClientError::Api {
            status: s,
            code: c,
            message,
        }) => {
            assert_eq!((s, c.as_str()), (status, code), "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

/// A pool of two swtpm hosts, both enrolled through the agent's own code
/// (ECC AKs), `tune` applied to the server's config; node1 whitelisted and
/// trusted, driven through its TPM worker directly so tests can shape its
/// evidence. The swtpms live as long as the values returned.
async fn trusted_node1(
    tune: impl FnOnce(&mut ServerConfig),
) -> anyhow::Result<(Pool, Host, SwTpm, SwTpm)> {
    test_support::require_tools()?;
    let swtpm = SwTpm::start()?;
    let swtpm2 = SwTpm::start()?;
    let cas = [swtpm.local_ca_certs(), swtpm2.local_ca_certs()].concat();
    let pool = Pool::start(
        &[("node1", swtpm.tcti()), ("node2", swtpm2.tcti())],
        30,
        |c| {
            c.ek_ca = cas;
            tune(c);
        },
    )
    .await?;
    for host in ["node1", "node2"] {
        let mut config = pool.agent_config(host)?;
        config.ak_type = AkType::Ecc;
        let mut agent = host_agent::Agent::new(&config)?;
        agent.enroll().await?;
        agent.shutdown().await;
    }
    let mut config = pool.agent_config("node1")?;
    config.ak_type = AkType::Ecc;
    let host = Host {
        api: pool.client("agent-node1")?,
        tpm: Tpm::start(&swtpm.tcti(), AkType::Ecc, &config.state_dir)?,
    };
    // Trusted baseline.
    let ch = host.challenge().await;
    host.submit(&host.evidence(&ch, None).await).await?;
    let _: serde_json::Value = pool
        .client("admin")?
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    host.genuine_round().await;
    Ok((pool, host, swtpm, swtpm2))
}

async fn assert_untrusted_by(pool: &Pool, step: &str, code: &str) {
    let t = pool.trust("node1").await.expect("trust");
    assert_eq!(t.trust, Trust::Untrusted, "after {code}: {t:?}");
    assert_eq!(
        (t.reasons[0].step.as_str(), t.reasons[0].code.as_str()),
        (step, code)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_evidence_is_refused_audited_and_never_trusted() -> anyhow::Result<()> {
    let (pool, host, swtpm, _swtpm2) = trusted_node1(|c| {
        c.challenge_ttl_secs = 2;
        c.max_body_bytes = 16 * 1024;
        c.max_evidence_bytes = 16 * 1024;
    })
    .await?;
    let admin = pool.client("admin")?;

    // Garbage and truncated quote bytes.
    let ch = host.challenge().await;
    let mut ev = host.evidence(&ch, None).await;
    let raw = B64.decode(&ev.attest)?;
    ev.attest = B64.encode(&raw[..raw.len() / 2]);
    expect_code(host.submit(&ev).await, 400, "attest_malformed");
    assert_untrusted_by(&pool, "decode", "attest_malformed").await;
    host.genuine_round().await;
    let ch = host.challenge().await;
    let mut ev = host.evidence(&ch, None).await;
    ev.attest = B64.encode(b"\xff\x54\x43\x47 garbage");
    expect_code(host.submit(&ev).await, 400, "attest_malformed");
    host.genuine_round().await;

    // A wrong signature.
    let ch = host.challenge().await;
    let mut ev = host.evidence(&ch, None).await;
    let mut sig = B64.decode(&ev.signature)?;
    let n = sig.len();
    sig[n - 3] ^= 0x40;
    ev.signature = B64.encode(&sig);
    expect_code(host.submit(&ev).await, 422, "signature_invalid");
    assert_untrusted_by(&pool, "signature", "signature_invalid").await;
    host.genuine_round().await;

    // A replayed nonce: the same genuine evidence twice.
    let ch = host.challenge().await;
    let ev = host.evidence(&ch, None).await;
    assert_eq!(host.submit(&ev).await?.trust, Trust::Trusted);
    expect_code(host.submit(&ev).await, 422, "nonce_replayed");
    assert_untrusted_by(&pool, "nonce", "nonce_replayed").await;
    host.genuine_round().await;

    // An expired nonce (challenge_ttl_secs = 2).
    let ch = host.challenge().await;
    let ev = host.evidence(&ch, None).await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    expect_code(host.submit(&ev).await, 422, "nonce_expired");
    host.genuine_round().await;

    // A nonce issued to another host: the pool's key does not vouch for it
    // as node1's.
    let node2 = pool.client("agent-node2")?;
    let ch2: Challenge = node2
        .post("/v1/agents/node2/challenge", &serde_json::json!({}))
        .await?;
    let ev = host.evidence(&ch2, None).await;
    expect_code(host.submit(&ev).await, 422, "nonce_unknown");
    assert_untrusted_by(&pool, "nonce", "nonce_unknown").await;
    host.genuine_round().await;
    // A nonce the pool never issued: node1's own with one bit flipped, quoted
    // and signed by node1's TPM.
    let mut forged = host.challenge().await;
    let mut bytes = hex::decode(&forged.nonce)?;
    bytes[0] ^= 1;
    forged.nonce = hex::encode(bytes);
    let ev_forged = host.evidence(&forged, None).await;
    expect_code(host.submit(&ev_forged).await, 422, "nonce_unknown");
    // ...which did not consume node2's nonce.
    let still: Result<HostTrust, _> = node2.post("/v1/agents/node2/evidence", &ev).await;
    assert!(
        !matches!(&still, Err(ClientError::Api { code, .. }) if code == "nonce_replayed"),
        "{still:?}"
    );
    host.genuine_round().await;

    // A PCR selection other than the one asked for.
    let ch = host.challenge().await;
    let fewer: proto::wire::PcrSelectionMap =
        [(HashAlg::Sha256, (0..=9).collect())].into_iter().collect();
    let ev = host.evidence(&ch, Some(&fewer)).await;
    expect_code(host.submit(&ev).await, 422, "pcr_selection_mismatch");
    assert_untrusted_by(&pool, "pcr_selection", "pcr_selection_mismatch").await;
    host.genuine_round().await;

    // Doctored PCR values (a real quote, values changed to please a whitelist).
    swtpm.pcr_extend(4, "sha256", &"44".repeat(32))?;
    let ch = host.challenge().await;
    let mut ev = host.evidence(&ch, None).await;
    ev.pcrs
        .get_mut(&HashAlg::Sha256)
        .expect("bank")
        .insert(4, "00".repeat(32));
    expect_code(host.submit(&ev).await, 422, "pcr_digest_mismatch");
    assert_untrusted_by(&pool, "pcr_digest", "pcr_digest_mismatch").await;
    // The honest quote of the extended PCR 4 is untrusted by the whitelist.
    let ch = host.challenge().await;
    let v = host.submit(&host.evidence(&ch, None).await).await?;
    assert_eq!(
        (v.trust, v.reasons[0].code.as_str()),
        (Trust::Untrusted, "pcr_not_whitelisted")
    );
    let _: serde_json::Value = admin
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    host.genuine_round().await;

    // Evidence for another host than the certificate's: refused, audited,
    // and node2's state untouched.
    let before = pool.trust("node2").await?;
    let ch = host.challenge().await;
    let ev = host.evidence(&ch, None).await;
    let r: Result<HostTrust, _> = host.api.post("/v1/agents/node2/evidence", &ev).await;
    expect_code(r, 403, "host_mismatch");
    assert_eq!(pool.trust("node2").await?, before);

    // Unknown JSON fields.
    let mut body = serde_json::to_value(&ev)?;
    body["trusted"] = serde_json::json!(true);
    let r: Result<HostTrust, _> = host.api.post("/v1/agents/node1/evidence", &body).await;
    expect_code(r, 400, "invalid_body");
    assert_untrusted_by(&pool, "decode", "invalid_body").await;

    // A body over the size limit (16 KiB here).
    let mut body = serde_json::to_value(&ev)?;
    body["attest"] = serde_json::json!("A".repeat(20 * 1024));
    let r: Result<HostTrust, _> = host.api.post("/v1/agents/node1/evidence", &body).await;
    expect_code(r, 413, "body_too_large");
    host.genuine_round().await;

    // No client certificate: a clear 401.
    let anonymous = reqwest::Client::builder()
        .use_preconfigured_tls(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&pool.path("ca.pem"))?)
            .with_no_client_auth(),
        )
        .build()?;
    let resp = anonymous
        .post(format!("{}/v1/agents/node1/evidence", pool.url))
        .json(&ev)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 401);
    let body: proto::wire::ErrorBody = resp.json().await?;
    assert_eq!(body.error.code, "client_certificate_required");

    // A certificate from another CA (a look-alike pool): the handshake fails.
    let other = tempfile::tempdir()?;
    attestation_server::ctl::init(&attestation_server::ctl::InitArgs {
        out: other.path().into(),
        server_port: 1,
        hosts: vec!["node1".into()],
        tctis: vec![],
        interval: 30,
        force: false,
        ek_cas: vec![],
    })?;
    let impostor = ApiClient::new(
        &pool.url,
        &proto::client::TlsFiles {
            ca: pool.path("ca.pem"),
            cert: other.path().join("agent-node1.pem"),
            key: other.path().join("agent-node1.key"),
        },
        Duration::from_secs(5),
    )?;
    let r: Result<Challenge, _> = impostor
        .post("/v1/agents/node1/challenge", &serde_json::json!({}))
        .await;
    assert!(matches!(r, Err(ClientError::Transport { .. })), "{r:?}");

    // The server is still serving and node1 is trusted again.
    host.genuine_round().await;

    // Every refused piece of evidence for node1 was audited as a failure.
    let events = pool.audit_events().await?;
    let codes: Vec<&str> = attestations(&events, "node1")
        .iter()
        .filter(|e| e["outcome"] == "failure")
        .filter_map(|e| e["reason"]["reasonCode"].as_str())
        .collect();
    for code in [
        "attest_malformed",
        "signature_invalid",
        "nonce_replayed",
        "nonce_expired",
        "nonce_unknown",
        "pcr_selection_mismatch",
        "pcr_digest_mismatch",
        "invalid_body",
        "body_too_large",
    ] {
        assert!(
            codes.contains(&code),
            "no audit event with {code}: {codes:?}"
        );
    }
    let mismatch = attestations(&events, "node2")
        .into_iter()
        .find(|e| e["reason"]["reasonCode"] == "host_mismatch")
        .expect("the attempt on node2 is audited");
    assert_eq!(mismatch["initiator"]["name"], "node1");
    assert_eq!(mismatch["outcome"], "failure");

    host.tpm.shutdown().await;
    pool.stop_and_dump_cadf("bad_input").await?;
    Ok(())
}

fn roots(ca: &std::path::Path) -> anyhow::Result<rustls::RootCertStore> {
    use rustls_pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
        store.add(c?)?;
    }
    Ok(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_evidence_keeps_being_refused_is_throttled() -> anyhow::Result<()> {
    let (pool, host, _swtpm, _swtpm2) = trusted_node1(|c| {
        c.failure_burst = 3;
        c.failure_refill_secs = 2;
    })
    .await?;

    // Evidence that is not genuine, `failure_burst` times in a row: each is
    // judged, refused and audited.
    let garbage = |ev: &mut Evidence| -> anyhow::Result<()> {
        let raw = B64.decode(&ev.attest)?;
        ev.attest = B64.encode(&raw[..raw.len() / 2]);
        Ok(())
    };
    // The quotes are made first and sent back to back: a quote can take a
    // second on a loaded machine, and a token refilled between two refusals
    // would leave the host one more try.
    let mut selection = Default::default();
    let mut refused = Vec::new();
    for _ in 0..3 {
        let ch = host.challenge().await;
        let mut ev = host.evidence(&ch, None).await;
        garbage(&mut ev)?;
        refused.push(ev);
        selection = ch.pcr_selection;
    }
    for ev in &refused {
        expect_code(host.submit(ev).await, 400, "attest_malformed");
    }
    let audited = attestations(&pool.audit_events().await?, "node1").len();

    // Now the host is answered 429 before any work: challenge and evidence,
    // with Retry-After, and nothing more is stored or audited.
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(proto::client::rustls_config(&pool.files("agent-node1"))?)
        .build()?;
    let resp = http
        .post(format!("{}/v1/agents/node1/challenge", pool.url))
        .json(&serde_json::json!({}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 429);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After header in seconds");
    assert!((1..=2).contains(&retry), "retry after {retry} s");
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "too_many_failures");
    let unissued = Challenge {
        nonce: "00".repeat(32),
        pcr_selection: selection,
        expires_at: chrono::Utc::now(),
        uefi_log: false,
        ima_from: None,
    };
    let mut ev = host.evidence(&unissued, None).await;
    garbage(&mut ev)?;
    expect_code(host.submit(&ev).await, 429, "too_many_failures");
    assert_eq!(
        attestations(&pool.audit_events().await?, "node1").len(),
        audited,
        "throttled requests store and audit nothing"
    );
    assert_eq!(pool.trust("node1").await?.trust, Trust::Untrusted);

    // Another host is not affected.
    let other: Challenge = pool
        .client("agent-node2")?
        .post("/v1/agents/node2/challenge", &serde_json::json!({}))
        .await?;
    assert_eq!(other.nonce.len(), 64);

    // After the refill period the host may try again; a genuine attestation
    // is trusted and gives it its whole burst back.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    host.genuine_round().await;
    for _ in 0..2 {
        let ch = host.challenge().await;
        let mut ev = host.evidence(&ch, None).await;
        garbage(&mut ev)?;
        expect_code(host.submit(&ev).await, 400, "attest_malformed");
    }
    host.genuine_round().await;
    Ok(())
}

/// Challenges are not stored: the nonce carries a digest of the PCRs it
/// asked for. Evidence answering a challenge from before a policy change
/// that changed what the server asks for is judged by what it quotes,
/// against the policy as it is now; it is not refused for its selection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_from_before_a_policy_change_is_judged_by_what_it_quotes() -> anyhow::Result<()>
{
    let (pool, host, _swtpm, _swtpm2) = trusted_node1(|_| {}).await?;
    let admin = pool.client("admin")?;
    // A group whose boot policy makes challenges ask for PCR 14 and the log.
    let _: serde_json::Value = admin
        .post(
            "/v1/whitelists",
            &serde_json::json!({"name": "boot", "parts": {"platform": {"boot": {"version": 1, "bank": "sha256", "secure_boot": true}}}}),
        )
        .await?;
    let _: serde_json::Value = admin
        .put(
            "/v1/groups/edge",
            &serde_json::json!({"whitelists": ["boot"]}),
        )
        .await?;
    let membership = |op: &str| serde_json::json!({ op: ["node1"] });
    let _: serde_json::Value = admin
        .post("/v1/groups/edge/hosts", &membership("add"))
        .await?;
    let ch = host.challenge().await;
    assert!(
        ch.pcr_selection[&HashAlg::Sha256].contains(&14),
        "{:?}",
        ch.pcr_selection
    );
    assert!(ch.uefi_log);

    // Back to its own whitelist (PCRs 0-10) before the evidence arrives.
    let _: serde_json::Value = admin
        .post("/v1/groups/edge/hosts", &membership("remove"))
        .await?;
    let now_asked = host.challenge().await.pcr_selection;
    assert!(!now_asked[&HashAlg::Sha256].contains(&14));
    let v = host.submit(&host.evidence(&ch, None).await).await?;
    assert_eq!(v.trust, Trust::Trusted, "{v:?}");

    // While the policy stays as it is, the quote must cover exactly what
    // was asked, as before.
    let ch = host.challenge().await;
    let more: proto::wire::PcrSelectionMap = [(HashAlg::Sha256, (0..=14).collect())]
        .into_iter()
        .collect();
    let ev = host.evidence(&ch, Some(&more)).await;
    expect_code(host.submit(&ev).await, 422, "pcr_selection_mismatch");
    host.genuine_round().await;
    pool.stop().await;
    Ok(())
}

/// A challenge issued before the pool's key was rotated is still answered
/// (the previous key opens it until it expires); one issued two rotations
/// back is refused as unknown, and the host stays trusted by what it sends
/// next. The server picks each rotation up from the database by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_from_before_a_key_rotation_is_still_answered() -> anyhow::Result<()> {
    use attestation_server::ctl::challenge_key::{run, ChallengeKeyCommand};
    let (pool, host, _swtpm, _swtpm2) = trusted_node1(|_| {}).await?;
    let rotate = ChallengeKeyCommand::Rotate {
        server_config: pool.path("server.toml"),
    };
    let ch = host.challenge().await;
    let evidence = host.evidence(&ch, None).await;
    run(&rotate).await?;
    let v = host.submit(&evidence).await?;
    assert_eq!(v.trust, Trust::Trusted, "{v:?}");

    let ch = host.challenge().await;
    let evidence = host.evidence(&ch, None).await;
    run(&rotate).await?;
    run(&rotate).await?;
    expect_code(host.submit(&evidence).await, 422, "nonce_unknown");
    host.genuine_round().await;
    // The rotation events go through the CADF conformance check too.
    pool.stop_and_dump_cadf("challenge_key_rotation").await?;
    Ok(())
}
