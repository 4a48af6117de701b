//! The spine end to end: a fresh swtpm, the server (SQLite) and a real host
//! agent over mutual TLS. The host is untrusted until an admin accepts its
//! PCR values, then trusted; a PCR extended on its TPM turns it untrusted at
//! the next attestation, with the PCR named; both show in the CADF audit file.

use e2e_tests::{attestations, Pool};
use proto::wire::Trust;
use proto::HashAlg;
use test_support::SwTpm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_trusted_then_untrusted_after_a_tamper() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs()
    })
    .await?;
    let agent = pool.spawn_agent("node1")?;

    // No whitelist yet: genuine evidence, but never trusted by default.
    let first = pool
        .wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    assert_eq!(first.trust, Trust::Untrusted);
    assert_eq!(first.reasons[0].code, "no_whitelist");

    // Accepting the reported values re-judges the host at once.
    let admin = pool.client("admin")?;
    let detail: proto::wire::HostDetail = admin
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    assert_eq!(detail.verdict.trust, Trust::Trusted, "{detail:?}");
    let golden7 = detail
        .whitelist
        .as_ref()
        .map(|w| w.pcrs[&HashAlg::Sha256][&7].clone());
    assert_eq!(golden7, Some(vec![tpm.pcr_read("sha256", 7)?]));

    // The next genuine attestation stays trusted.
    let trusted = pool
        .wait_for("node1", "a newer trusted verdict", |t| {
            t.trust == Trust::Trusted && t.verified_at > detail.verdict.verified_at
        })
        .await?;
    assert!(trusted.reasons.is_empty());

    // Tamper: extend PCR 7 on the host's TPM.
    tpm.pcr_extend(7, "sha256", &"5a".repeat(32))?;
    let tampered_value = tpm.pcr_read("sha256", 7)?;
    let tampered_at = chrono::Utc::now();
    let untrusted = pool
        .wait_for("node1", "untrusted after the tamper", |t| {
            t.trust == Trust::Untrusted
        })
        .await?;
    assert!(untrusted.verified_at >= Some(tampered_at - chrono::Duration::seconds(5)));
    let reason = &untrusted.reasons[0];
    assert_eq!(reason.code, "pcr_not_whitelisted");
    let fault = reason.pcr.as_ref().expect("the failing PCR is named");
    assert_eq!((fault.index, fault.bank), (7, HashAlg::Sha256));
    assert_eq!(fault.actual.as_deref(), Some(tampered_value.as_str()));
    assert_eq!(Some(fault.expected.clone()), golden7);

    // The scheduler's view agrees.
    let sched = pool.client("scheduler")?;
    let answer: proto::wire::TrustQueryResponse = sched
        .post(
            "/v1/trust/query",
            &serde_json::json!({"hosts": ["node1", "ghost"]}),
        )
        .await?;
    assert_eq!(answer.hosts[0].trust, Trust::Untrusted);
    assert_eq!(answer.hosts[1].trust, Trust::Unknown);

    agent.stop().await?;

    // The audit file holds a success event and, after the tamper, a failure
    // naming the whitelist step, with the measured PCR 7 value.
    let events = pool.audit_events().await?;
    let attests = attestations(&events, "node1");
    assert!(attests.iter().any(|e| e["outcome"] == "success"));
    let failure = attests
        .iter()
        .rev()
        .find(|e| e["outcome"] == "failure" && e["reason"]["reasonCode"] == "pcr_not_whitelisted")
        .expect("a failure event for the tamper");
    assert_eq!(failure["typeURI"], proto::cadf::EVENT_TYPE_URI);
    assert_eq!(failure["observer"]["typeURI"], "service/security");
    assert_eq!(failure["target"]["typeURI"], "compute/machine");
    assert_eq!(failure["reason"]["reasonType"], "attestation/whitelist");
    let measured: Vec<&serde_json::Value> = failure["measurements"]
        .as_array()
        .expect("measurements")
        .iter()
        .filter(|m| m["metric"]["name"] == "PCR 7 (sha256)")
        .collect();
    assert_eq!(measured.len(), 1);
    assert_eq!(measured[0]["result"], tampered_value.as_str());
    // Every attestation after the tamper was judged untrusted: no trusted
    // verdict slipped in between.
    let after: Vec<_> = attests
        .iter()
        .filter(|e| {
            e["eventTime"].as_str().unwrap_or_default()
                > proto::cadf::timestamp(tampered_at).as_str()
        })
        .collect();
    assert!(!after.is_empty());
    assert!(after.iter().all(|e| e["outcome"] == "failure"), "{after:?}");
    pool.stop_and_dump_cadf("trust_flow").await?;
    Ok(())
}
