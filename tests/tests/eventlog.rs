//! Event logs on the attestation path (issue 7), end to end on swtpm: the
//! PCRs of a fresh swtpm are extended with the events of a recorded UEFI
//! log so that its quote matches the log; the host is trusted under a boot
//! policy made from that log, and untrusted, with the PCR and the altered
//! event named, once the log it sends is altered. IMA: entries extended
//! into PCR 10 and allowed by a runtime policy (Keylime's format, put into
//! the whitelist by `attestctl whitelist set-policy`) are trusted; one more entry
//! the policy does not know makes the host untrusted, naming the file, and
//! only the new entry is sent (incremental verification). A first list
//! over 1 MiB goes through the server's multi-core path with the same
//! result.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use e2e_tests::{Agent, Pool};
use proto::bootpolicy::BootPolicy;
use proto::eventlog::{self, EV_EFI_BOOT_SERVICES_APPLICATION, EV_NO_ACTION};
use proto::ima::{self, ImaEntry, Template};
use proto::policy::ChangeReport;
use proto::wire::{HostTrust, Trust};
use proto::HashAlg;
use serde_json::json;
use std::path::{Path, PathBuf};
use test_support::SwTpm;

/// SHA-256 only, Secure Boot on, no StartupLocality event (a fresh swtpm's
/// PCR 0 starts at zero, as this log's replay does).
const UEFI_LOG: &str = "create-mb-policy-secureboot.bin";

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(path)
}

/// Start the agent of `host` with its log paths pointed at test files.
fn spawn_agent(pool: &Pool, host: &str, uefi: &Path, ima: &Path) -> anyhow::Result<Agent> {
    let mut config = pool.agent_config(host)?;
    config.uefi_log_path = uefi.to_path_buf();
    config.ima_log_path = ima.to_path_buf();
    Ok(Agent::spawn(config))
}

/// A verdict made after `after` (a later attestation).
async fn verdict_after(
    pool: &Pool,
    after: chrono::DateTime<chrono::Utc>,
    what: &str,
    pred: impl Fn(&HostTrust) -> bool,
) -> anyhow::Result<HostTrust> {
    pool.wait_for("node1", what, |t| {
        t.verified_at.is_some_and(|v| v > after) && pred(t)
    })
    .await
}

/// Put node1 in group `edge` judged by whitelist `fleet` made of `parts`.
async fn judge_by(pool: &Pool, parts: serde_json::Value) -> anyhow::Result<()> {
    let admin = pool.client("admin")?;
    let _: ChangeReport = admin
        .post("/v1/whitelists", &json!({"name": "fleet", "parts": parts}))
        .await?;
    let _: ChangeReport = admin
        .put("/v1/groups/edge", &json!({"whitelists": ["fleet"]}))
        .await?;
    let _: ChangeReport = admin
        .post("/v1/groups/edge/hosts", &json!({"add": ["node1"]}))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_uefi_log_is_untrusted_naming_pcr_and_event() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let bytes = std::fs::read(fixture(&format!("eventlog/{UEFI_LOG}")))?;
    let log = eventlog::parse(&bytes)?;
    assert_eq!(log.startup_locality(), None);
    assert_eq!(log.banks(), [HashAlg::Sha256]);

    // Make the swtpm's PCRs what this log says the firmware measured.
    let tpm = SwTpm::start()?;
    for e in log.events.iter().filter(|e| e.event_type != EV_NO_ACTION) {
        let digest = e.digest(HashAlg::Sha256).expect("sha256 digest");
        tpm.pcr_extend(u8::try_from(e.pcr)?, "sha256", &hex::encode(digest))?;
    }
    let replay = &log.replay()[&HashAlg::Sha256];
    for (pcr, value) in replay {
        assert_eq!(
            tpm.pcr_read("sha256", u8::try_from(*pcr)?)?,
            hex::encode(value),
            "PCR {pcr} after extending the log"
        );
    }

    // The log in base64 is ~55 KiB, within the evidence route's own limit
    // (max_evidence_bytes, 16 MiB by default), not the 64 KiB of other bodies.
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
    })
    .await?;
    let uefi_path = pool.path("binary_bios_measurements");
    std::fs::write(&uefi_path, &bytes)?;
    let ima_path = pool.path("no-ima");
    let agent = spawn_agent(&pool, "node1", &uefi_path, &ima_path)?;
    let first = pool
        .wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    assert_eq!(first.reasons[0].code, "no_whitelist", "{first:?}");

    // A boot policy made from the log, plus the golden firmware PCRs.
    let boot = BootPolicy::from_eventlog(&log);
    assert!(
        boot.evaluate(&log).is_empty(),
        "the log passes its own policy"
    );
    assert!(boot.secure_boot == Some(true));
    let golden: serde_json::Map<String, serde_json::Value> = (0u8..8)
        .map(|i| (i.to_string(), json!([hex::encode(&replay[&u32::from(i)])])))
        .collect();
    let changed_at = chrono::Utc::now();
    judge_by(
        &pool,
        json!({"platform": {"pcrs": {"sha256": golden}, "boot": boot}}),
    )
    .await?;
    let trusted = verdict_after(&pool, changed_at, "trusted with the UEFI log", |t| {
        t.trust == Trust::Trusted
    })
    .await?;
    assert!(trusted.reasons.is_empty(), "{trusted:?}");
    let applied = trusted.policy.as_ref().unwrap();
    assert_eq!(applied.parts[0].part, "platform");
    // 8 PCRs and the boot policy.
    assert_eq!(applied.parts[0].pcrs_checked, 9);

    // A policy change is judged from the stored log: a dry run of a boot
    // policy that no longer allows the first boot application names it.
    let app = log
        .events
        .iter()
        .find(|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
        .expect("a boot application event");
    let app_digest = hex::encode(app.digest(HashAlg::Sha256).unwrap());
    let mut stricter = boot.clone();
    stricter
        .boot_applications
        .as_mut()
        .unwrap()
        .remove(&app_digest);
    let admin = pool.client("admin")?;
    let dry: ChangeReport = admin
        .put(
            "/v1/whitelists/fleet?dry_run=true",
            &json!({"parts": {"platform": {"pcrs": {"sha256": golden}, "boot": stricter}},
                    "base_version": 1}),
        )
        .await?;
    assert_eq!(dry.changed.len(), 1, "{dry:?}");
    let why = &dry.changed[0].reasons[0];
    assert_eq!(why.code, "boot_application_digest", "{why:?}");
    assert!(
        why.message.contains(&format!("at event {}", app.index)),
        "{why:?}"
    );
    assert_eq!(why.pcr.as_ref().map(|p| p.index), Some(4));
    assert_eq!(
        why.pcr.as_ref().and_then(|p| p.actual.clone()),
        Some(app_digest.clone())
    );

    // Alter the log the agent sends: one boot application's digest.
    let digest_at = bytes
        .get(app.offset..app.data_offset)
        .and_then(|event| {
            event
                .windows(32)
                .position(|w| w == app.digest(HashAlg::Sha256).unwrap())
        })
        .map(|p| app.offset + p)
        .expect("the digest is in the event header");
    let mut altered = bytes.clone();
    altered[digest_at] ^= 0x01;
    std::fs::write(&uefi_path, &altered)?;
    let altered_at = chrono::Utc::now();
    let untrusted = verdict_after(&pool, altered_at, "untrusted by the altered log", |t| {
        t.trust == Trust::Untrusted
    })
    .await?;
    let reason = &untrusted.reasons[0];
    assert_eq!(
        (reason.step.as_str(), reason.code.as_str()),
        ("eventlog", "eventlog_replay_mismatch"),
        "{untrusted:?}"
    );
    let pcr = reason.pcr.as_ref().expect("the PCR is named");
    assert_eq!((pcr.index, pcr.bank), (4, HashAlg::Sha256));
    assert_eq!(
        pcr.actual.as_deref(),
        Some(hex::encode(&replay[&4]).as_str())
    );
    assert!(
        reason.message.contains(&format!(
            "event {} (EV_EFI_BOOT_SERVICES_APPLICATION) is the first in PCR 4",
            app.index
        )),
        "{reason:?}"
    );
    assert!(
        reason.message.contains(&app_digest),
        "names the expected digest: {reason:?}"
    );

    // The genuine log again: trusted again.
    std::fs::write(&uefi_path, &bytes)?;
    let restored_at = chrono::Utc::now();
    verdict_after(&pool, restored_at, "trusted again", |t| {
        t.trust == Trust::Trusted
    })
    .await?;

    // No log at all: the boot policy fails closed.
    std::fs::remove_file(&uefi_path)?;
    let removed_at = chrono::Utc::now();
    let missing = verdict_after(&pool, removed_at, "untrusted without a log", |t| {
        t.trust == Trust::Untrusted
    })
    .await?;
    assert_eq!(missing.reasons[0].code, "eventlog_missing", "{missing:?}");

    agent.stop().await?;
    pool.stop().await;
    drop(tpm);
    Ok(())
}

/// node1's IMA state as the server stored it.
async fn stored_ima_state(pool: &Pool) -> anyhow::Result<attestation_server::verify::HostImaState> {
    pool.state
        .store
        .host("node1")
        .await?
        .and_then(|r| r.ima_state)
        .ok_or_else(|| anyhow::anyhow!("no IMA state is stored for node1"))
}

/// An `ima-ng` entry with a sha256 file digest made from its path.
fn entry(path: &str) -> ImaEntry {
    let digest = HashAlg::Sha256.hash(&[path.as_bytes()]);
    ima::make_entry(Template::ImaNg, HashAlg::Sha256, &digest, path, &[]).unwrap()
}

fn extend_pcr10(tpm: &SwTpm, e: &ImaEntry) -> anyhow::Result<()> {
    let th = e.template_hash_for(HashAlg::Sha256);
    tpm.pcr_extend(10, "sha256", &hex::encode(th.as_slice()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ima_entries_are_verified_incrementally() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let files = ["/usr/bin/bash", "/usr/lib/libc.so.6", "/usr/sbin/nginx"];
    let entries: Vec<ImaEntry> = files.iter().map(|f| entry(f)).collect();
    for e in &entries {
        extend_pcr10(&tpm, e)?;
    }
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
    })
    .await?;
    let ima_path = pool.path("ascii_runtime_measurements");
    std::fs::write(&ima_path, ima::encode_ascii(&entries))?;
    let agent = spawn_agent(&pool, "node1", &pool.path("no-uefi"), &ima_path)?;
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;

    // The runtime policy as Keylime writes it, imported as it is.
    let digests: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|f| {
            let d = hex::encode(HashAlg::Sha256.hash(&[f.as_bytes()]));
            (f.to_string(), json!([d]))
        })
        .collect();
    let keylime = json!({
        "meta": {"version": 1, "generator": 1},
        "release": 0,
        "digests": digests,
        "excludes": [],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": null},
        "ima-buf": {},
        "verification-keys": ""
    });
    let policy_file = pool.path("runtime-policy.json");
    std::fs::write(&policy_file, keylime.to_string())?;
    let changed_at = chrono::Utc::now();
    pool.attestctl(&format!(
        "whitelist set-policy fleet --part runtime --runtime {}",
        policy_file.display()
    ))
    .await?;
    pool.attestctl("group set edge --whitelist fleet").await?;
    pool.attestctl("group add edge node1").await?;
    let trusted = verdict_after(&pool, changed_at, "trusted with IMA", |t| {
        t.trust == Trust::Trusted
    })
    .await?;
    assert!(trusted.reasons.is_empty(), "{trusted:?}");
    let state = stored_ima_state(&pool).await?;
    assert_eq!(state.state.entries_verified, 3);

    // A file the policy does not know: measured (PCR 10 extended) and
    // appended to the list, as the kernel does.
    let rogue = entry("/tmp/.hidden/miner");
    extend_pcr10(&tpm, &rogue)?;
    let mut all = entries.clone();
    all.push(rogue.clone());
    std::fs::write(&ima_path, ima::encode_ascii(&all))?;
    let rogue_at = chrono::Utc::now();
    let untrusted = verdict_after(&pool, rogue_at, "untrusted by the new file", |t| {
        t.trust == Trust::Untrusted
    })
    .await?;
    let reason = &untrusted.reasons[0];
    assert_eq!(reason.code, "ima_not_in_policy", "{untrusted:?}");
    assert!(
        reason.message.contains("/tmp/.hidden/miner") && reason.message.contains("entry 4"),
        "{reason:?}"
    );
    let state = stored_ima_state(&pool).await?;
    assert_eq!(state.state.entries_verified, 4);
    // Only the new entry was sent: the server counts what evidence carried.
    // The three entries once, then the new one (twice at most: a list read
    // just after an extend the quote missed is sent again next round).
    let metrics = pool
        .http("admin")?
        .get(format!("{}/metrics", pool.url))
        .send()
        .await?
        .text()
        .await?;
    let count = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    let received = count("attestation_ima_entries_received_total ");
    let verified = count("attestation_ima_entries_verified_total ");
    assert_eq!(verified, Some(4), "{metrics}");
    assert!(
        received.is_some_and(|r| (4..=5).contains(&r)),
        "only new entries are sent: {received:?} received"
    );
    // The failure sticks: later rounds send nothing new, the verdict stays.
    let later = chrono::Utc::now();
    let still = verdict_after(&pool, later, "a later verdict", |_| true).await?;
    assert_eq!(still.trust, Trust::Untrusted);
    assert_eq!(still.reasons[0].code, "ima_not_in_policy");

    // An entry not yet in the quote (read after quoting) waits for the next
    // round; but a list that no prefix of replays to PCR 10 is altered:
    // the kernel measured one file, the list claims another.
    // Its line is edited in place: the logged template hash is the real
    // file's, so the reason names the entry.
    extend_pcr10(&tpm, &entry("/usr/bin/real"))?;
    all.push(entry("/usr/bin/real"));
    let forged = ima::encode_ascii(&all).replace(" /usr/bin/real\n", " /usr/bin/fake\n");
    std::fs::write(&ima_path, forged)?;
    let forged_at = chrono::Utc::now();
    let refused = verdict_after(&pool, forged_at, "the altered list refused", |t| {
        t.reasons.first().is_some_and(|r| r.step == "ima_log")
    })
    .await?;
    let reason = &refused.reasons[0];
    assert_eq!(reason.code, "ima_replay_mismatch", "{refused:?}");
    assert_eq!(reason.pcr.as_ref().map(|p| p.index), Some(10));
    assert!(reason.message.contains("entries 5-5"), "{reason:?}");
    assert!(
        reason
            .message
            .contains("; entry 5 (line 5, /usr/bin/fake) is not what"),
        "{reason:?}"
    );

    agent.stop().await?;
    pool.stop().await;
    drop(tpm);
    Ok(())
}

/// A host's whole list, over 1 MiB (as at a first attestation after boot):
/// the server parses and hashes it on every core, off the async workers,
/// and judges it as it would a short one; one wrong digest deep in it is
/// named by path and position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_list_is_verified_on_every_core_with_its_bad_entry_named() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let files: Vec<String> = (0..10_000)
        .map(|i| format!("/usr/lib/x86_64-linux-gnu/long-list/lib{i:05}.so.1"))
        .collect();
    let entries: Vec<ImaEntry> = files.iter().map(|f| entry(f)).collect();
    let text = ima::encode_ascii(&entries);
    assert!(
        text.len() >= ima::PARALLEL_MIN_BYTES,
        "{} bytes",
        text.len()
    );
    let hashes: Vec<String> = entries
        .iter()
        .map(|e| hex::encode(e.template_hash_for(HashAlg::Sha256).as_slice()))
        .collect();
    tpm.pcr_extend_all(10, "sha256", &hashes)?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
        // A runtime policy of 10,000 paths is a ~1.2 MB request.
        c.max_body_bytes = 4 * 1024 * 1024;
    })
    .await?;
    let ima_path = pool.path("ascii_runtime_measurements");
    std::fs::write(&ima_path, &text)?;
    let agent = spawn_agent(&pool, "node1", &pool.path("no-uefi"), &ima_path)?;
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;

    // Every file allowed, but entry 7,778's with another digest.
    let bad = 7_777;
    let digests: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let content = if i == bad { "tampered" } else { f.as_str() };
            let d = hex::encode(HashAlg::Sha256.hash(&[content.as_bytes()]));
            (f.clone(), json!([format!("sha256:{d}")]))
        })
        .collect();
    let changed_at = chrono::Utc::now();
    judge_by(&pool, json!({"runtime": {"runtime": {"digests": digests}}})).await?;
    let judged = verdict_after(&pool, changed_at, "the whole list judged", |t| {
        t.reasons
            .first()
            .is_some_and(|r| r.code == "ima_digest_mismatch")
    })
    .await?;
    assert_eq!(judged.trust, Trust::Untrusted);
    assert_eq!(judged.reasons.len(), 1, "{judged:?}");
    let reason = &judged.reasons[0];
    assert!(
        reason.message.contains(&files[bad])
            && reason.message.contains(&format!("entry {}", bad + 1)),
        "{reason:?}"
    );
    let state = stored_ima_state(&pool).await?;
    assert_eq!(state.state.entries_verified, 10_000);
    assert_eq!(
        state.state.pcr10(HashAlg::Sha256),
        Some(
            tpm.pcr_read("sha256", 10)
                .map(|h| hex::decode(h).unwrap())?
                .as_slice()
        )
    );

    agent.stop().await?;
    pool.stop().await;
    Ok(())
}
