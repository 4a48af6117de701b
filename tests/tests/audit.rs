//! The audit trail with a real TPM: enrollment, activation, attestations
//! (pass and fail, with measurements), the admin's whitelist change, the
//! trust changes the scanner reports, and an agent speaking for another
//! host. Every event is dumped to target/cadf-samples/e2e.jsonl, which
//! scripts/check-cadf.py loads with pycadf.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use e2e_tests::Pool;
use proto::wire::Trust;
use std::path::{Path, PathBuf};
use test_support::SwTpm;

fn samples_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("cadf-samples");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn kind(e: &serde_json::Value) -> String {
    e["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|t| t.as_str()?.strip_prefix("kind?value=").map(str::to_string))
        .unwrap_or_default()
}

/// The audit events once one has a reason code `pred` accepts (at most
/// 30 s: the outbox delivers them to the JSON-lines sink).
async fn wait_for_reason(
    pool: &Pool,
    pred: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    for _ in 0..300 {
        let events = pool.audit_events().await?;
        if events
            .iter()
            .any(|e| e["reason"]["reasonCode"].as_str().is_some_and(&pred))
        {
            return Ok(events);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("no audit event with the reason code awaited after 30 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_host_leaves_a_complete_cadf_trail() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
        c.audit.trust_scan_secs = 1;
    })
    .await?;
    let agent = pool.spawn_agent("node1")?;
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    let admin = pool.client("admin")?;
    let _: serde_json::Value = admin
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    pool.wait_for("node1", "trusted", |t| t.trust == Trust::Trusted)
        .await?;
    // The scanner samples trust states (every second here): let it see
    // the host trusted before the change, or a loaded machine can make it
    // miss the trusted state and report unknown -> untrusted.
    wait_for_reason(&pool, |code| code.ends_with("_to_trusted")).await?;
    tpm.pcr_extend(7, "sha256", &"5a".repeat(32))?;
    pool.wait_for("node1", "untrusted", |t| t.trust == Trust::Untrusted)
        .await?;
    // An agent's certificate used for another host: refused and audited.
    let err = pool
        .client("agent-node1")?
        .post::<_, serde_json::Value>("/v1/agents/node2/challenge", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("host_mismatch"));
    agent.stop().await?;

    // The scanner reported trusted -> untrusted.
    let events = wait_for_reason(&pool, |code| code == "trusted_to_untrusted").await?;
    let kinds: Vec<String> = events.iter().map(kind).collect();
    for k in [
        "host.create",       // enrollment (pending)
        "host.authenticate", // credential activation
        "attestation",
        "whitelist.create", // the host's own whitelist, version 1
        "trust_change",
        "access_denied",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event in {kinds:?}");
    }
    assert!(events
        .iter()
        .any(|e| e["reason"]["reasonCode"] == "trusted_to_untrusted"));
    let denied = events
        .iter()
        .find(|e| kind(e) == "access_denied")
        .expect("the refused request");
    assert_eq!(denied["initiator"]["name"], "node1");
    assert_eq!(denied["reason"]["reasonCode"], "host_mismatch");
    assert_eq!(denied["action"], "create");
    // Attestations carry measurements; failed ones a reason with the policy.
    let failed = events
        .iter()
        .find(|e| {
            kind(e) == "attestation"
                && e["outcome"] == "failure"
                && e["reason"]["reasonCode"] == "pcr_not_whitelisted"
        })
        .expect("a failed attestation");
    assert_eq!(failed["reason"]["policyType"], "whitelist");
    assert!(!failed["measurements"].as_array().unwrap().is_empty());
    // Every event links to a correlation id and names its reporter.
    for e in &events {
        assert!(
            e["tags"].to_string().contains("correlation_id?value="),
            "{e}"
        );
        assert_eq!(e["reporterchain"][0]["role"], "observer");
    }

    // The query API finds the attestations of node1.
    let page: serde_json::Value = admin
        .get("/v1/events?target=node1&action=evaluate&limit=1000")
        .await?;
    let n = page["events"].as_array().unwrap().len();
    assert_eq!(n, kinds.iter().filter(|k| *k == "attestation").count());

    let store = pool.state.store.clone();
    pool.stop().await;
    attestation_server::audit::ctl::export(store.as_ref(), &samples_dir().join("e2e.jsonl"))
        .await?;
    Ok(())
}
