//! Whitelist policy end to end (issue 4): two swtpm hosts in one group, a
//! rolling firmware upgrade with two acceptable values, the old value
//! removed, dry runs that agree with the real changes, versions kept and
//! named by verdicts, and every bad edit refused with nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use e2e_tests::Pool;
use proto::client::ClientError;
use proto::policy::{ChangeReport, DiffEntry, Group, PartOutcome, WhitelistVersion};
use proto::wire::{HostTrust, Trust, TrustQueryResponse};
use proto::HashAlg;
use serde_json::json;
use test_support::SwTpm;

fn api_code(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Hosts whose trust a change reports as changing, with before and after.
fn changes(r: &ChangeReport) -> Vec<(String, Trust, Trust)> {
    let mut v: Vec<_> = r
        .changed
        .iter()
        .map(|c| (c.host.clone(), c.before, c.after))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

async fn scheduler_view(pool: &Pool) -> anyhow::Result<Vec<Trust>> {
    let answer: TrustQueryResponse = pool
        .client("scheduler")?
        .post("/v1/trust/query", &json!({"hosts": ["node1", "node2"]}))
        .await?;
    Ok(answer.hosts.iter().map(|h| h.trust).collect())
}

fn judged_against(t: &HostTrust) -> Vec<String> {
    t.policy
        .as_ref()
        .map(|p| p.whitelists.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_firmware_upgrade_with_versioned_whitelists() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm1 = SwTpm::start()?;
    let tpm2 = SwTpm::start()?;
    let cas = [tpm1.local_ca_certs(), tpm2.local_ca_certs()].concat();
    let pool = Pool::start(&[("node1", tpm1.tcti()), ("node2", tpm2.tcti())], 1, |c| {
        c.ek_ca = cas
    })
    .await?;
    let mut agents = Vec::new();
    for host in ["node1", "node2"] {
        agents.push(pool.spawn_agent(host)?);
    }
    for host in ["node1", "node2"] {
        let first = pool
            .wait_for(host, "a first verdict", |t| t.verified_at.is_some())
            .await?;
        assert_eq!(first.reasons[0].code, "no_whitelist", "{first:?}");
    }
    let admin = pool.client("admin")?;
    let old_pcr0 = tpm1.pcr_read("sha256", 0)?;
    assert_eq!(old_pcr0, tpm2.pcr_read("sha256", 0)?, "same firmware");

    // Version 1 from a golden host: the platform part, PCRs 0-7, sha256.
    let golden = json!({"host": "node1", "part": "platform", "banks": ["sha256"]});
    let v1: ChangeReport = admin.post("/v1/whitelists/fleet/golden", &golden).await?;
    let wl = v1.whitelist.as_ref().unwrap();
    assert_eq!(wl.version, 1);
    assert_eq!(wl.parts["platform"].pcrs[&HashAlg::Sha256].len(), 8);
    assert_eq!(v1.hosts_judged, 0, "no group uses it yet");

    // A group requiring the platform part; adding the hosts, dry run first.
    let group: ChangeReport = admin
        .put(
            "/v1/groups/edge",
            &json!({"whitelists": ["fleet"], "match_policy": {"platform": "required"}}),
        )
        .await?;
    assert_eq!(group.group.as_ref().unwrap().version, 1);
    let add = json!({"add": ["node1", "node2"]});
    let dry: ChangeReport = admin
        .post("/v1/groups/edge/hosts?dry_run=true", &add)
        .await?;
    assert!(!dry.applied);
    assert_eq!(
        changes(&dry),
        [
            ("node1".into(), Trust::Untrusted, Trust::Trusted),
            ("node2".into(), Trust::Untrusted, Trust::Trusted)
        ]
    );
    assert_eq!(
        scheduler_view(&pool).await?,
        [Trust::Untrusted; 2],
        "dry run changed nothing"
    );
    let real: ChangeReport = admin.post("/v1/groups/edge/hosts", &add).await?;
    assert!(real.applied);
    assert_eq!(
        changes(&real),
        changes(&dry),
        "the dry run predicted the change"
    );
    // At once, without waiting for a quote.
    assert_eq!(scheduler_view(&pool).await?, [Trust::Trusted; 2]);
    let t = pool.trust("node1").await?;
    assert_eq!(judged_against(&t), ["fleet@1"]);
    let parts = &t.policy.as_ref().unwrap().parts;
    assert_eq!(parts[0].part, "platform");
    assert_eq!(parts[0].outcome, PartOutcome::Pass);
    assert_eq!(parts[0].pcrs_checked, 8);

    // Firmware upgrade on node2: PCR 0 changes; its next quote is untrusted.
    tpm2.pcr_extend(0, "sha256", &"f1".repeat(32))?;
    let new_pcr0 = tpm2.pcr_read("sha256", 0)?;
    let upgraded = pool
        .wait_for("node2", "untrusted after the firmware upgrade", |t| {
            t.trust == Trust::Untrusted
        })
        .await?;
    let fault = upgraded.reasons[0].pcr.as_ref().unwrap();
    assert_eq!(upgraded.reasons[0].code, "pcr_not_whitelisted");
    assert_eq!(fault.index, 0);
    assert_eq!(fault.part.as_deref(), Some("platform"));
    assert_eq!(fault.whitelist.as_deref(), Some("fleet@1"));
    assert_eq!(fault.expected, vec![old_pcr0.clone()]);
    assert_eq!(fault.actual.as_deref(), Some(new_pcr0.as_str()));

    // Rolling upgrade: accept node2's new values as well (version 2).
    let add_new =
        json!({"host": "node2", "part": "platform", "banks": ["sha256"], "base_version": 1});
    let dry: ChangeReport = admin
        .post("/v1/whitelists/fleet/golden?dry_run=true", &add_new)
        .await?;
    assert_eq!(
        changes(&dry),
        [("node2".into(), Trust::Untrusted, Trust::Trusted)]
    );
    assert_eq!(
        dry.diff,
        [DiffEntry {
            part: "platform".into(),
            bank: Some(HashAlg::Sha256),
            pcr: Some(0),
            policy: None,
            pointer: None,
            added: vec![new_pcr0.clone()],
            removed: vec![],
        }]
    );
    let real: ChangeReport = admin.post("/v1/whitelists/fleet/golden", &add_new).await?;
    assert_eq!(changes(&real), changes(&dry));
    assert_eq!(
        scheduler_view(&pool).await?,
        [Trust::Trusted; 2],
        "old and new firmware both pass"
    );
    assert_eq!(judged_against(&pool.trust("node2").await?), ["fleet@2"]);

    // Upgrade done elsewhere: drop the old value (version 3). node1, still
    // on the old firmware, turns untrusted at once.
    let mut v2: WhitelistVersion = admin.get("/v1/whitelists/fleet").await?;
    assert_eq!(v2.version, 2);
    v2.parts
        .get_mut("platform")
        .unwrap()
        .pcrs
        .get_mut(&HashAlg::Sha256)
        .unwrap()
        .insert(0, vec![new_pcr0.clone()]);
    let update = json!({"parts": v2.parts, "base_version": 2});
    let dry: ChangeReport = admin
        .put("/v1/whitelists/fleet?dry_run=true", &update)
        .await?;
    assert_eq!(
        changes(&dry),
        [("node1".into(), Trust::Trusted, Trust::Untrusted)]
    );
    assert_eq!(dry.hosts_judged, 2);
    assert_eq!(
        admin
            .get::<WhitelistVersion>("/v1/whitelists/fleet")
            .await?
            .version,
        2
    );
    let real: ChangeReport = admin.put("/v1/whitelists/fleet", &update).await?;
    assert_eq!(changes(&real), changes(&dry));
    assert_eq!(
        scheduler_view(&pool).await?,
        [Trust::Untrusted, Trust::Trusted]
    );
    let node1 = pool.trust("node1").await?;
    let fault = node1.reasons[0].pcr.as_ref().unwrap();
    assert_eq!(
        (fault.index, fault.whitelist.as_deref()),
        (0, Some("fleet@3"))
    );
    assert_eq!(fault.actual.as_deref(), Some(old_pcr0.as_str()));
    assert_eq!(fault.expected, vec![new_pcr0.clone()]);
    // The next real quotes agree with the re-judged verdicts.
    let later = pool
        .wait_for("node2", "a newer verdict", |t| {
            t.verified_at > node1.verified_at
        })
        .await?;
    assert_eq!(
        (later.trust, judged_against(&later)),
        (Trust::Trusted, vec!["fleet@3".to_string()])
    );
    assert_eq!(pool.trust("node1").await?.trust, Trust::Untrusted);

    // Versions are kept; the diff between 1 and 3 shows the swap.
    let history: Vec<WhitelistVersion> = admin.get("/v1/whitelists/fleet/versions").await?;
    assert_eq!(
        history.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(history.iter().all(|v| v.created_by == "admin"));
    let diff: Vec<DiffEntry> = admin.get("/v1/whitelists/fleet/diff?from=1&to=3").await?;
    assert_eq!(diff.len(), 1);
    assert_eq!(
        (diff[0].added.clone(), diff[0].removed.clone()),
        (vec![new_pcr0.clone()], vec![old_pcr0.clone()])
    );

    // Bad edits: a clear 4xx each, and version 3 stays the newest.
    let pcr = |index: u32, value: String| json!({"parts": {"platform": {"pcrs": {"sha256": {index.to_string(): [value]}}}}, "base_version": 3});
    let cases: Vec<(&str, &str, serde_json::Value, u16, &str)> = vec![
        (
            "PUT",
            "/v1/whitelists/fleet",
            pcr(24, "00".repeat(32)),
            400,
            "pcr_index_out_of_range",
        ),
        (
            "PUT",
            "/v1/whitelists/fleet",
            pcr(0, "00".repeat(20)),
            400,
            "digest_malformed",
        ),
        (
            "PUT",
            "/v1/whitelists/fleet",
            json!({"parts": {"platform": {"pcrs": {"md5": {"0": ["00"]}}}}, "base_version": 3}),
            400,
            "invalid_body",
        ),
        (
            "PUT",
            "/v1/whitelists/fleet",
            json!({"parts": {}, "base_version": 2}),
            409,
            "version_conflict",
        ),
        (
            "PUT",
            "/v1/whitelists/fleet",
            json!({"parts": {}}),
            400,
            "base_version_required",
        ),
        (
            "POST",
            "/v1/whitelists",
            json!({"name": "fleet", "parts": {}}),
            409,
            "whitelist_exists",
        ),
        (
            "POST",
            "/v1/whitelists",
            json!({"name": "no/slash", "parts": {}}),
            400,
            "invalid_name",
        ),
        (
            "PUT",
            "/v1/groups/edge",
            json!({"whitelists": ["fleet", "fleet"], "base_version": 1}),
            400,
            "duplicate_name",
        ),
        (
            "PUT",
            "/v1/groups/edge",
            json!({"whitelists": ["nope"], "base_version": 1}),
            404,
            "unknown_whitelist",
        ),
    ];
    let duplicate_key = r#"{"parts": {"os": {}, "os": {}}, "base_version": 3}"#;
    for (method, path, body, status, code) in cases {
        let result = match method {
            "PUT" => admin.put::<_, serde_json::Value>(path, &body).await,
            _ => admin.post::<_, serde_json::Value>(path, &body).await,
        };
        assert_eq!(
            api_code(result.unwrap_err()),
            (status, code.to_string()),
            "{method} {path} {body}"
        );
    }
    let raw = pool
        .http("admin")?
        .put(format!("{}/v1/whitelists/fleet", pool.url))
        .header("content-type", "application/json")
        .body(duplicate_key)
        .send()
        .await?;
    assert_eq!(raw.status(), 400);
    assert!(raw.text().await?.contains("duplicate key"));
    let in_use = admin
        .delete::<serde_json::Value>("/v1/whitelists/fleet")
        .await
        .unwrap_err();
    let ClientError::Api {
        status,
        code,
        message,
    } = in_use
    else {
        panic!()
    };
    assert_eq!((status, code.as_str()), (409, "whitelist_in_use"));
    assert!(message.contains("edge"), "{message}");
    let forbidden = pool
        .client("scheduler")?
        .put::<_, serde_json::Value>(
            "/v1/whitelists/fleet",
            &json!({"parts": {}, "base_version": 3}),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(forbidden), (403, "forbidden".into()));
    assert_eq!(
        admin
            .get::<WhitelistVersion>("/v1/whitelists/fleet")
            .await?
            .version,
        3
    );
    let g: Group = admin.get("/v1/groups/edge").await?;
    assert_eq!((g.version, g.hosts.len()), (1, 2));

    // Every change is a CADF event on data/security/policy by the admin;
    // the refused conflict is recorded as a failure.
    let events = pool.audit_events().await?;
    let policy: Vec<_> = events
        .iter()
        .filter(|e| e["target"]["typeURI"] == "data/security/policy")
        .collect();
    let seen: Vec<(String, String)> = policy
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for expected in [("create", "success"), ("update", "success")] {
        assert!(
            seen.contains(&(expected.0.into(), expected.1.into())),
            "{seen:?}"
        );
    }
    assert!(policy.iter().all(|e| e["initiator"]["name"] == "admin"));
    assert!(policy
        .iter()
        .any(|e| e["target"]["name"] == "whitelist fleet@3" && e["outcome"] == "success"));

    for agent in agents {
        agent.stop().await?;
    }
    pool.stop_and_dump_cadf("policy").await?;
    Ok(())
}

/// The attestctl verbs on a running server: Keylime tpm_policy import,
/// export and import between names, diff, and the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestctl_imports_exports_and_diffs_whitelists() -> anyhow::Result<()> {
    use attestation_server::ctl::CtlError;
    let pool = Pool::start(&[("node1", "device:/dev/null".to_string())], 30, |_| {}).await?;
    let (a, b) = ("aa".repeat(32), "bb".repeat(32));
    let keylime = pool.path("tpm_policy.json");
    std::fs::write(
        &keylime,
        format!(r#"{{"mask":"0x408000","15":["{a}","{b}"],"22":"{a}"}}"#),
    )?;

    let report = pool
        .attestctl(&format!(
            "whitelist import-keylime kl --file {} --part platform",
            keylime.display()
        ))
        .await?;
    assert_eq!(report["applied"], true);
    assert_eq!(report["whitelist"]["version"], 1);
    let pcrs = &report["whitelist"]["parts"]["platform"]["pcrs"]["sha256"];
    assert_eq!(pcrs["15"], json!([a, b]));
    assert_eq!(pcrs["22"], json!([a]));

    // Export, then import under another name: the same parts.
    let file = pool.path("kl.json");
    pool.attestctl(&format!("whitelist export kl --out {}", file.display()))
        .await?;
    let copy = pool
        .attestctl(&format!("whitelist import {} --name kl2", file.display()))
        .await?;
    assert_eq!(copy["whitelist"]["parts"], report["whitelist"]["parts"]);
    // Importing over an existing whitelist needs the version it replaces.
    let err = pool
        .attestctl(&format!("whitelist import {}", file.display()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CtlError::Client(ClientError::Api { code, .. }) if code == "whitelist_exists"),
        "{err}"
    );
    // A new version from an edited file, then the diff between the two.
    let edited = std::fs::read_to_string(&file)?.replace(&b, &"cc".repeat(32));
    std::fs::write(&file, edited)?;
    let v2 = pool
        .attestctl(&format!(
            "whitelist import {} --base-version 1",
            file.display()
        ))
        .await?;
    assert_eq!(v2["whitelist"]["version"], 2);
    let diff = pool.attestctl("whitelist diff kl 1 2").await?;
    assert_eq!(diff["changes"][0]["pcr"], 15);
    assert_eq!(diff["changes"][0]["added"], json!(["cc".repeat(32)]));
    assert_eq!(diff["changes"][0]["removed"], json!([b]));
    let history = pool.attestctl("whitelist history kl").await?;
    assert_eq!(history.as_array().map(Vec::len), Some(2));

    // A Keylime file that disagrees with itself is refused before any call.
    std::fs::write(&keylime, format!(r#"{{"mask":"0x1","15":["{a}"]}}"#))?;
    let err = pool
        .attestctl(&format!(
            "whitelist import-keylime kl --file {} --part platform --base-version 2",
            keylime.display()
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, CtlError::Input { .. }), "{err}");

    // Groups from the CLI; deleting a used whitelist names the group.
    pool.attestctl("group set g1 --whitelist kl,kl2 --require platform")
        .await?;
    let err = pool.attestctl("whitelist delete kl2").await.unwrap_err();
    assert!(err.to_string().contains("g1"), "{err}");
    let shown = pool.attestctl("group show g1").await?;
    assert_eq!(shown["whitelists"], json!(["kl", "kl2"]));
    assert_eq!(shown["match_policy"]["platform"], "required");
    pool.attestctl("group set g1 --whitelist kl --base-version 1")
        .await?;
    let deleted = pool.attestctl("whitelist delete kl2").await?;
    assert_eq!(deleted["whitelist"]["deleted"], true);
    let list = pool.attestctl("whitelist list").await?;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["name"] == "kl2" && w["deleted"] == true));

    // Event-log policies into a part: a flat allowlist and a boot policy,
    // as they are, next to the part's PCR values, which stay.
    let allowlist = pool.path("allowlist.txt");
    std::fs::write(&allowlist, format!("# a comment\n{a}  /usr/bin/bash\n"))?;
    let boot = pool.path("boot-policy.json");
    std::fs::write(
        &boot,
        r#"{"version": 1, "bank": "sha256", "kernel_cmdline": ["^/vmlinuz"]}"#,
    )?;
    let v3 = pool
        .attestctl(&format!(
            "whitelist set-policy kl --part platform --runtime {} --boot {} --base-version 2",
            allowlist.display(),
            boot.display()
        ))
        .await?;
    let part = &v3["whitelist"]["parts"]["platform"];
    assert_eq!(v3["whitelist"]["version"], 3);
    assert_eq!(part["pcrs"]["sha256"]["22"], json!([a]));
    assert_eq!(part["runtime"]["digests"]["/usr/bin/bash"], json!([a]));
    assert_eq!(part["boot"]["kernel_cmdline"], json!(["^/vmlinuz"]));
    // Refused before any call: nothing to set, a bad pattern, a file that
    // is no policy at all; the whitelist stays at version 3.
    let err = pool
        .attestctl("whitelist set-policy kl --part platform --base-version 3")
        .await
        .unwrap_err();
    assert!(matches!(err, CtlError::Input { .. }), "{err}");
    std::fs::write(
        &boot,
        r#"{"version": 1, "bank": "sha256", "kernel_cmdline": ["("]}"#,
    )?;
    std::fs::write(&allowlist, "not-hex /usr/bin/bash\n")?;
    for (flag, file) in [("--boot", &boot), ("--runtime", &allowlist)] {
        let err = pool
            .attestctl(&format!(
                "whitelist set-policy kl --part platform {flag} {} --base-version 3",
                file.display()
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, CtlError::Input { .. }), "{flag}: {err}");
    }
    let newest = pool.attestctl("whitelist get kl").await?;
    assert_eq!(newest["version"], 3);
    pool.stop_and_dump_cadf("policy-cli").await?;
    Ok(())
}
