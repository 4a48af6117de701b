//! Host identity end to end, on real swtpm TPMs with EK certificates from
//! their own local CAs: EK certificate chain, credential activation, host ↔
//! EK pinning and operator re-key, reboot detection, and every refusal with
//! its code and audit event.

use base64::Engine;
use e2e_tests::Pool;
use host_agent::tpm::Tpm;
use host_agent::AkType;
use proto::client::{ApiClient, ClientError};
use proto::wire::{
    ActivateRequest, ActivateResponse, Challenge, EnrollRequest, EnrollResponse, Evidence,
    HostTrust,
};
use std::time::Duration;
use test_support::SwTpm;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One TPM as seen through the agent's TPM worker.
struct Machine {
    swtpm: SwTpm,
    tpm: Tpm,
    state: tempfile::TempDir,
}

impl Machine {
    fn start() -> anyhow::Result<Machine> {
        let swtpm = SwTpm::start()?;
        let state = tempfile::tempdir()?;
        let tpm = Tpm::start(&swtpm.tcti(), AkType::Rsa, state.path())?;
        Ok(Machine { swtpm, tpm, state })
    }

    async fn request(&self) -> anyhow::Result<EnrollRequest> {
        let ak = self.tpm.ensure_ak().await?;
        let ek = self.tpm.ek_identity().await?;
        Ok(EnrollRequest {
            ek_certificate: ek.certificate.map(|c| B64.encode(c)),
            ek_public: B64.encode(ek.public),
            ak_public: B64.encode(ak.public),
            ak_name: Some(hex::encode(ak.name)),
        })
    }

    /// Activate the server's credential with this TPM; the agent's proof.
    async fn proof(&self, offer: &EnrollResponse, host: &str) -> anyhow::Result<String> {
        let secret = self
            .tpm
            .activate_credential(
                &B64.decode(&offer.credential_blob)?,
                &B64.decode(&offer.encrypted_secret)?,
            )
            .await?;
        Ok(attestation_server::enroll::proof(&secret, host))
    }
}

async fn enroll(
    api: &ApiClient,
    host: &str,
    req: &EnrollRequest,
) -> Result<EnrollResponse, ClientError> {
    api.post(&format!("/v1/agents/{host}/enroll"), req).await
}

async fn activate(
    api: &ApiClient,
    host: &str,
    id: &str,
    proof: &str,
) -> Result<ActivateResponse, ClientError> {
    let req = ActivateRequest {
        enrollment_id: id.into(),
        proof: proof.into(),
    };
    api.post(&format!("/v1/agents/{host}/activate"), &req).await
}

/// Enroll and activate: the happy path.
async fn join(api: &ApiClient, host: &str, m: &Machine) -> anyhow::Result<ActivateResponse> {
    let offer = enroll(api, host, &m.request().await?).await?;
    Ok(activate(
        api,
        host,
        &offer.enrollment_id,
        &m.proof(&offer, host).await?,
    )
    .await?)
}

/// One genuine attestation round with this machine's AK.
async fn attest(api: &ApiClient, host: &str, m: &Machine) -> Result<HostTrust, ClientError> {
    let ch: Challenge = api
        .post(
            &format!("/v1/agents/{host}/challenge"),
            &serde_json::json!({}),
        )
        .await?;
    let nonce = hex::decode(&ch.nonce).unwrap_or_default();
    let q = m
        .tpm
        .quote(&nonce, &ch.pcr_selection)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let ev = Evidence {
        nonce: ch.nonce,
        attest: B64.encode(q.attest),
        signature: B64.encode(q.signature),
        pcrs: q.pcrs,
        uefi_log: None,
        ima: None,
    };
    api.post(&format!("/v1/agents/{host}/evidence"), &ev).await
}

fn code_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn ca_files(m: &Machine) -> Vec<std::path::PathBuf> {
    m.swtpm.local_ca_certs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_is_proven_pinned_and_refusals_are_audited() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let a = Machine::start()?;
    let b = Machine::start()?;
    let d = Machine::start()?;
    let c = Machine::start()?; // its CA is not trusted
    let trusted: Vec<_> = [&a, &b, &d].iter().flat_map(|m| ca_files(m)).collect();
    let pool = Pool::start(
        &[
            ("node1", a.swtpm.tcti()),
            ("node2", b.swtpm.tcti()),
            ("node3", c.swtpm.tcti()),
            ("node4", c.swtpm.tcti()),
        ],
        30,
        |cfg| {
            cfg.ek_ca = trusted.clone();
            cfg.allow_without_ek_certificate = vec!["node4".into()];
            cfg.enrollment_ttl_secs = 4;
        },
    )
    .await?;
    let n1 = pool.client("agent-node1")?;
    let n2 = pool.client("agent-node2")?;
    let n3 = pool.client("agent-node3")?;
    let n4 = pool.client("agent-node4")?;

    // node1 joins with TPM A through the real agent code path.
    let mut config = pool.agent_config("node1")?;
    config.state_dir = pool.path("state-node1");
    let mut agent = host_agent::Agent::new(&config)?;
    let joined = agent.enroll().await?;
    assert_eq!(joined.host, "node1");
    agent.shutdown().await;
    let detail: proto::wire::HostDetail = pool.client("admin")?.get("/v1/hosts/node1").await?;
    assert_eq!(detail.ak_name.as_deref(), Some(joined.ak_name.as_str()));

    // node2 with TPM B, step by step: no quotes before activation.
    let offer = enroll(&n2, "node2", &b.request().await?).await?;
    let r: Result<Challenge, _> = n2
        .post("/v1/agents/node2/challenge", &serde_json::json!({}))
        .await;
    assert_eq!(code_of(r).1, "ak_not_enrolled");
    // Wrong proof: refused, and the enrollment is used up.
    let (status, code, _) =
        code_of(activate(&n2, "node2", &offer.enrollment_id, &"ab".repeat(32)).await);
    assert_eq!((status, code.as_str()), (403, "activation_proof_invalid"));
    let good = b.proof(&offer, "node2").await?;
    let (status, code, _) = code_of(activate(&n2, "node2", &offer.enrollment_id, &good).await);
    assert_eq!((status, code.as_str()), (409, "enrollment_used"));
    let (status, code, _) = code_of(activate(&n2, "node2", "no-such-enrollment", &good).await);
    assert_eq!((status, code.as_str()), (404, "enrollment_unknown"));
    // Too late.
    let offer = enroll(&n2, "node2", &b.request().await?).await?;
    let proof = b.proof(&offer, "node2").await?;
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let (status, code, _) = code_of(activate(&n2, "node2", &offer.enrollment_id, &proof).await);
    assert_eq!((status, code.as_str()), (410, "enrollment_expired"));
    // Another host's enrollment id is unknown to this host.
    let offer = enroll(&n2, "node2", &b.request().await?).await?;
    let (_, code, _) = code_of(activate(&n1, "node1", &offer.enrollment_id, &proof).await);
    assert_eq!(code, "enrollment_unknown");
    // ...and that did not use it up: node2 completes it.
    let proof = b.proof(&offer, "node2").await?;
    activate(&n2, "node2", &offer.enrollment_id, &proof).await?;
    assert_eq!(
        attest(&n2, "node2", &b).await?.trust,
        proto::wire::Trust::Untrusted,
        "accepted; no whitelist yet"
    );

    // The credential only opens in the TPM that holds the EK and the AK:
    // TPM D cannot activate a credential made for TPM B.
    let offer = enroll(&n2, "node2", &b.request().await?).await?;
    assert!(d.proof(&offer, "node2").await.is_err());

    // EK certificate from an unknown CA: refused, naming the issuer.
    let (status, code, message) = code_of(enroll(&n3, "node3", &c.request().await?).await);
    assert_eq!(
        (status, code.as_str()),
        (403, "ek_certificate_unknown_issuer")
    );
    assert!(
        message.contains("swtpm") || message.contains("CN="),
        "{message}"
    );
    // A certificate of another TPM's EK.
    let mut mixed = b.request().await?;
    mixed.ek_certificate = a.request().await?.ek_certificate;
    let (status, code, _) = code_of(enroll(&n3, "node3", &mixed).await);
    assert_eq!(
        (status, code.as_str()),
        (400, "ek_certificate_key_mismatch")
    );
    // Malformed DER.
    let mut broken = a.request().await?;
    broken.ek_certificate = Some(B64.encode(b"\x30\x82\x01 not der"));
    let (status, code, _) = code_of(enroll(&n3, "node3", &broken).await);
    assert_eq!((status, code.as_str()), (400, "ek_certificate_malformed"));
    // An "AK" that is a decryption key (the EK itself).
    let mut not_ak = a.request().await?;
    not_ak.ak_public = not_ak.ek_public.clone();
    let (status, code, _) = code_of(enroll(&n3, "node3", &not_ak).await);
    assert_eq!((status, code.as_str()), (400, "ak_invalid"));
    // An AK name that is not the digest of the AK's public area.
    let mut wrong_name = a.request().await?;
    wrong_name.ak_name = Some("000b".to_string() + &"11".repeat(32));
    let (status, code, _) = code_of(enroll(&n3, "node3", &wrong_name).await);
    assert_eq!((status, code.as_str()), (400, "ak_name_mismatch"));
    // No EK certificate: refused unless the operator allowed this host.
    let mut bare = c.request().await?;
    bare.ek_certificate = None;
    let (status, code, _) = code_of(enroll(&n3, "node3", &bare).await);
    assert_eq!((status, code.as_str()), (403, "ek_certificate_required"));
    let offer = enroll(&n4, "node4", &bare).await?;
    activate(
        &n4,
        "node4",
        &offer.enrollment_id,
        &c.proof(&offer, "node4").await?,
    )
    .await?;

    // Pinning: the same EK under a second host name is refused...
    let (status, code, _) = code_of(enroll(&n3, "node3", &a.request().await?).await);
    assert_eq!((status, code.as_str()), (409, "ek_in_use"));
    // ...and so is another EK for a pinned host, until an admin approves.
    let (status, code, message) = code_of(enroll(&n1, "node1", &d.request().await?).await);
    assert_eq!((status, code.as_str()), (409, "ek_conflict"));
    assert!(message.contains("rekey"), "{message}");
    let admin = pool.client("admin")?;
    let _: proto::wire::HostDetail = admin
        .post("/v1/hosts/node1/rekey", &serde_json::json!({}))
        .await?;
    let rekeyed = join(&n1, "node1", &d).await?;
    assert_ne!(rekeyed.ak_name, joined.ak_name);
    attest(&n1, "node1", &d).await?;
    // The old TPM's AK is no longer accepted for node1.
    let r = attest(&n1, "node1", &a).await;
    assert_eq!(code_of(r).1, "signature_invalid");
    // The approval was for one re-key only.
    let (_, code, _) = code_of(enroll(&n1, "node1", &b.request().await?).await);
    assert!(code == "ek_conflict" || code == "ek_in_use", "{code}");

    // Reboot detection: restart TPM B (PCRs reset, reset count up).
    let mut b = b;
    b.swtpm.restart()?;
    if b.swtpm.tcti() != pool.agent_config("node2")?.tcti {
        // The restarted swtpm moved ports: follow it with a new worker.
        let state = tempfile::tempdir()?;
        for f in ["ak-rsa.priv", "ak-rsa.pub"] {
            let _ = std::fs::copy(b.state.path().join(f), state.path().join(f));
        }
        b.tpm = Tpm::start(&b.swtpm.tcti(), AkType::Rsa, state.path())?;
        b.state = state;
    }
    attest(&n2, "node2", &b).await?;

    let events = pool.audit_events().await?;
    let about = |host: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["target"]["name"] == host)
            .collect()
    };
    let reboot = about("node2")
        .into_iter()
        .find(|e| e["reason"]["reasonCode"] == "reboot")
        .expect("a reboot event for node2");
    assert_eq!(reboot["action"], "monitor");
    for code in [
        "activation_proof_invalid",
        "enrollment_used",
        "enrollment_expired",
    ] {
        assert!(
            about("node2")
                .iter()
                .any(|e| e["outcome"] == "failure" && e["reason"]["reasonCode"] == code),
            "no failure event {code}"
        );
    }
    for code in [
        "ek_certificate_unknown_issuer",
        "ek_certificate_key_mismatch",
        "ek_certificate_malformed",
        "ak_invalid",
        "ak_name_mismatch",
        "ek_certificate_required",
        "ek_in_use",
    ] {
        assert!(
            about("node3")
                .iter()
                .any(|e| e["outcome"] == "failure" && e["reason"]["reasonCode"] == code),
            "no failure event {code}"
        );
    }
    assert!(about("node1")
        .iter()
        .any(|e| e["reason"]["reasonCode"] == "ek_conflict"));
    assert!(about("node1")
        .iter()
        .any(|e| e["reason"]["reasonCode"] == "rekey_approved"));
    let uncertified = about("node4")
        .into_iter()
        .filter(|e| e["action"] == "authenticate" && e["outcome"] == "success")
        .collect::<Vec<_>>();
    assert_eq!(uncertified.len(), 1);
    assert!(uncertified[0]["tags"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t == "ek_certificate?value=absent")));

    for m in [a, b, c, d] {
        m.tpm.shutdown().await;
    }
    pool.stop_and_dump_cadf("identity").await?;
    Ok(())
}
