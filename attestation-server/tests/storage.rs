//! The storage suite, run against SQLite and PostgreSQL alike.
//!
//! PostgreSQL is expected on 127.0.0.1:5432 (override the server with
//! ATTEST_TEST_PG_URL, e.g. postgres://postgres@127.0.0.1:5432/postgres).
//! Each run creates and drops its own database. Under CI=true a missing
//! PostgreSQL fails the run; elsewhere the PostgreSQL half is skipped loudly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::store::{
    self, ActivateOutcome, ApplyOutcome, AttestationRecord, Enrollment, NewEvent, PolicyChange,
    Recorded, Rejudged, Store, UsedNonce,
};
use chrono::{Duration, DurationRound, Utc};
use proto::policy::{Group, MatchPolicy, Part, WhitelistVersion};
use proto::tpm::ClockInfo;
use proto::wire::{HostTrust, PcrValues, Reason, Trust};
use proto::HashAlg;
use sqlx::Connection;
use std::collections::BTreeMap;
use std::sync::Arc;

fn event(host: &str, n: u32) -> NewEvent {
    NewEvent {
        id: uuid::Uuid::new_v4().to_string(),
        time: Utc::now(),
        host: Some(host.into()),
        body: format!("{{\"n\":{n}}}"),
    }
}

fn pcrs(v: &str) -> PcrValues {
    [(
        HashAlg::Sha256,
        [(0u8, v.to_string()), (7u8, "11".repeat(32))]
            .into_iter()
            .collect(),
    )]
    .into_iter()
    .collect()
}

fn whitelist_version(name: &str, version: u32, pcr0: &str, deleted: bool) -> WhitelistVersion {
    WhitelistVersion {
        name: name.into(),
        version,
        description: Some(format!("v{version}")),
        parts: BTreeMap::from([(
            "platform".to_string(),
            Part {
                pcrs: BTreeMap::from([(
                    HashAlg::Sha256,
                    BTreeMap::from([(0u8, vec![pcr0.to_string()])]),
                )]),
                ..Part::default()
            },
        )]),
        deleted,
        created_at: Utc::now()
            .duration_trunc(Duration::microseconds(1))
            .unwrap(),
        created_by: "admin".into(),
    }
}

fn policy_event(n: u32) -> NewEvent {
    NewEvent {
        id: uuid::Uuid::new_v4().to_string(),
        time: Utc::now(),
        host: None,
        body: format!("{{\"policy\":{n}}}"),
    }
}

/// Versioned whitelists and groups: optimistic concurrency, in-use refusals,
/// history, and the policy that judges a host.
async fn policy_suite(s: Arc<dyn Store>) {
    let now = Utc::now()
        .duration_trunc(Duration::microseconds(1))
        .unwrap();
    s.register_host("p1", now).await.unwrap();
    s.register_host("p2", now).await.unwrap();
    let put = |v: WhitelistVersion, expected_head| PolicyChange::PutWhitelist {
        version: v,
        expected_head,
    };
    let events_before = s.events_after(0, 10_000).await.unwrap().len();

    let v1 = whitelist_version("fleet", 1, &"01".repeat(32), false);
    let applied = s
        .apply_policy_change(&put(v1.clone(), None), &[], &[], &policy_event(1))
        .await
        .unwrap();
    assert_eq!(applied, ApplyOutcome::Applied);
    // Creating it again, or editing from a stale version, is a conflict.
    let again = whitelist_version("fleet", 1, &"02".repeat(32), false);
    assert_eq!(
        s.apply_policy_change(&put(again, None), &[], &[], &policy_event(2))
            .await
            .unwrap(),
        ApplyOutcome::Conflict { current: Some(1) }
    );
    let v2 = whitelist_version("fleet", 2, &"02".repeat(32), false);
    assert_eq!(
        s.apply_policy_change(&put(v2.clone(), Some(1)), &[], &[], &policy_event(3))
            .await
            .unwrap(),
        ApplyOutcome::Applied
    );
    let stale = whitelist_version("fleet", 2, &"03".repeat(32), false);
    assert_eq!(
        s.apply_policy_change(&put(stale, Some(1)), &[], &[], &policy_event(4))
            .await
            .unwrap(),
        ApplyOutcome::Conflict { current: Some(2) }
    );
    assert_eq!(s.whitelist("fleet", None).await.unwrap(), Some(v2.clone()));
    assert_eq!(
        s.whitelist("fleet", Some(1)).await.unwrap(),
        Some(v1.clone())
    );
    assert_eq!(
        s.whitelist_history("fleet").await.unwrap(),
        vec![v1, v2.clone()]
    );

    // A group using it, with a member: the member is judged by it.
    let group = Group {
        name: "edge".into(),
        version: 1,
        description: None,
        whitelists: vec!["fleet".into()],
        match_policy: BTreeMap::from([("platform".to_string(), MatchPolicy::Required)]),
        updated_at: now,
        hosts: vec![],
    };
    let put_group = PolicyChange::PutGroup {
        group: group.clone(),
        expected_version: None,
    };
    assert_eq!(
        s.apply_policy_change(&put_group, &[], &[], &policy_event(5))
            .await
            .unwrap(),
        ApplyOutcome::Applied
    );
    assert_eq!(
        s.apply_policy_change(&put_group, &[], &[], &policy_event(6))
            .await
            .unwrap(),
        ApplyOutcome::Conflict { current: Some(1) }
    );
    let members = PolicyChange::Members {
        group: "edge".into(),
        add: vec!["p1".into()],
        remove: vec![],
    };
    s.apply_policy_change(&members, &["p1".to_string()], &[], &policy_event(7))
        .await
        .unwrap();
    // The change bumped p1's policy epoch: a verdict judged before it is
    // refused (nothing stored), one judged after is stored.
    let p1 = s.host("p1").await.unwrap().unwrap();
    assert_eq!(p1.policy_epoch, 1);
    let verdict = HostTrust {
        host: "p1".into(),
        trust: Trust::Trusted,
        verified_at: Some(now),
        expires_at: Some(now + Duration::seconds(60)),
        reasons: vec![],
        policy: None,
    };
    let rec = |epoch| AttestationRecord {
        verdict: &verdict,
        verified_pcrs: None,
        clock: None,
        events: &[],
        policy_epoch: Some(epoch),
        nonce: None,
    };
    assert_eq!(
        s.record_attestation("p1", rec(0)).await.unwrap(),
        Recorded::PolicyChanged
    );
    assert!(s.host("p1").await.unwrap().unwrap().verdict.is_none());
    assert_eq!(
        s.record_attestation("p1", rec(1)).await.unwrap(),
        Recorded::Stored
    );
    assert_eq!(
        s.host("p1").await.unwrap().unwrap().verdict,
        Some(verdict.clone())
    );
    // A re-judged verdict for evidence that is no longer the newest is Stale.
    let older = HostTrust {
        verified_at: Some(now - Duration::seconds(5)),
        ..verdict.clone()
    };
    let rejudge = [Rejudged {
        host: "p1".into(),
        verdict: older,
    }];
    assert_eq!(
        s.apply_policy_change(&members, &[], &rejudge, &policy_event(70))
            .await
            .unwrap(),
        ApplyOutcome::Stale { host: "p1".into() }
    );
    assert_eq!(
        s.host("p1").await.unwrap().unwrap().group.as_deref(),
        Some("edge")
    );
    assert_eq!(
        s.group("edge").await.unwrap().unwrap().hosts,
        vec!["p1".to_string()]
    );
    assert_eq!(
        s.groups_using("fleet").await.unwrap(),
        vec!["edge".to_string()]
    );
    let hp = s.host_policy("p1").await.unwrap();
    assert_eq!(hp.group.map(|g| g.name), Some("edge".into()));
    assert_eq!(hp.whitelists, vec![v2.clone()]);
    assert!(s.host_policy("p2").await.unwrap().whitelists.is_empty());
    // A host's own whitelist and its group's, by name; a host's own listed
    // by its group too is there once.
    let own = whitelist_version("host:p1", 1, &"04".repeat(32), false);
    assert_eq!(
        s.apply_policy_change(&put(own.clone(), None), &[], &[], &policy_event(71))
            .await
            .unwrap(),
        ApplyOutcome::Applied
    );
    assert_eq!(
        s.host_policy("p1").await.unwrap().whitelists,
        vec![v2.clone(), own.clone()]
    );
    let both = Group {
        whitelists: vec!["fleet".into(), "host:p1".into()],
        ..s.group("edge").await.unwrap().unwrap()
    };
    let version = both.version;
    let both = Group {
        version: version + 1,
        ..both
    };
    assert_eq!(
        s.apply_policy_change(
            &PolicyChange::PutGroup {
                group: both,
                expected_version: Some(version),
            },
            &[],
            &[],
            &policy_event(72)
        )
        .await
        .unwrap(),
        ApplyOutcome::Applied
    );
    assert_eq!(
        s.host_policy("p1").await.unwrap().whitelists,
        vec![v2.clone(), own]
    );
    assert!(s.host_policy("p2").await.unwrap().whitelists.is_empty());

    // Deleting a whitelist a group uses, or a group with hosts, is refused.
    let delete = whitelist_version("fleet", 3, &"00".repeat(32), true);
    assert_eq!(
        s.apply_policy_change(&put(delete.clone(), Some(2)), &[], &[], &policy_event(8))
            .await
            .unwrap(),
        ApplyOutcome::InUse {
            by: vec!["edge".into()]
        }
    );
    let delete_group = PolicyChange::DeleteGroup {
        name: "edge".into(),
    };
    assert_eq!(
        s.apply_policy_change(&delete_group, &[], &[], &policy_event(9))
            .await
            .unwrap(),
        ApplyOutcome::InUse {
            by: vec!["p1".into()]
        }
    );
    // Empty the group, delete it, then the whitelist: versions stay readable.
    let out = PolicyChange::Members {
        group: "edge".into(),
        add: vec![],
        remove: vec!["p1".into()],
    };
    s.apply_policy_change(&out, &[], &[], &policy_event(10))
        .await
        .unwrap();
    assert_eq!(s.host("p1").await.unwrap().unwrap().group, None);
    assert_eq!(
        s.apply_policy_change(&delete_group, &[], &[], &policy_event(11))
            .await
            .unwrap(),
        ApplyOutcome::Applied
    );
    assert_eq!(
        s.apply_policy_change(&put(delete, Some(2)), &[], &[], &policy_event(12))
            .await
            .unwrap(),
        ApplyOutcome::Applied
    );
    assert!(s.whitelist("fleet", None).await.unwrap().unwrap().deleted);
    assert_eq!(s.whitelist("fleet", Some(2)).await.unwrap(), Some(v2));
    assert!(s.group("edge").await.unwrap().is_none());
    let summary = s.whitelists().await.unwrap();
    assert!(summary
        .iter()
        .any(|w| w.name == "fleet" && w.deleted && w.version == 3));

    // Only applied changes left events (refusals rolled back).
    let events = s.events_after(0, 10_000).await.unwrap();
    let bodies: Vec<&str> = events[events_before..]
        .iter()
        .map(|(_, b)| b.as_str())
        .collect();
    assert_eq!(
        bodies,
        [1, 3, 5, 7, 71, 72, 10, 11, 12].map(|n| format!("{{\"policy\":{n}}}"))
    );
}

/// Several servers share one PostgreSQL: a nonce issued by one is accepted
/// once by any, and a second use is a replay on every server, also when the
/// two race for it.
async fn two_servers_one_database(url: &str) {
    let a = store::open(url).await.unwrap();
    let b = store::open(url).await.unwrap();
    let now = Utc::now()
        .duration_trunc(Duration::microseconds(1))
        .unwrap();
    a.register_host("x1", now).await.unwrap();
    let key = a.challenge_keys().await.unwrap();
    assert_eq!(key.current.len(), 32);
    assert_eq!((&key.previous, key.rotated_at), (&None, None));
    assert_eq!(
        b.challenge_keys().await.unwrap(),
        key,
        "one key for the pool"
    );
    assert_eq!(a.challenge_keys().await.unwrap(), key, "and it stays");
    // Every host record carries the keys' generation, so a rotation made
    // through one server reaches the other on its next request.
    let seen = |s: &std::sync::Arc<dyn store::Store>| {
        let s = s.clone();
        async move {
            s.host("x1")
                .await
                .unwrap()
                .unwrap()
                .challenge_key_generation
        }
    };
    assert_eq!(seen(&b).await, key.generation);
    let rotated = a.rotate_challenge_key(&event("x1", 990)).await.unwrap();
    assert_eq!(rotated.generation, key.generation + 1);
    assert_eq!(rotated.previous.as_ref(), Some(&key.current));
    assert_ne!(rotated.current, key.current);
    assert!(rotated
        .rotated_at
        .is_some_and(|t| (t - Utc::now()).num_seconds().abs() < 60));
    assert_eq!(b.challenge_keys().await.unwrap(), rotated);
    assert_eq!(seen(&b).await, rotated.generation);
    let again = b.rotate_challenge_key(&event("x1", 991)).await.unwrap();
    assert_eq!(
        again.previous.as_ref(),
        Some(&rotated.current),
        "only one key back"
    );
    let v = trusted_at("x1", now);
    let rec = |n: &'static UsedNonce| AttestationRecord {
        verdict: &v,
        verified_pcrs: None,
        clock: None,
        events: &[],
        policy_epoch: None,
        nonce: Some(n),
    };
    let n1: &'static UsedNonce = Box::leak(Box::new(used("cd".repeat(32), now, true)));
    assert_eq!(
        a.record_attestation("x1", rec(n1)).await.unwrap(),
        Recorded::Stored
    );
    assert_eq!(
        b.record_attestation("x1", rec(n1)).await.unwrap(),
        Recorded::NonceUsed,
        "server B sees the nonce server A stored as used"
    );
    // Racing: 16 uses of one fresh nonce split over both servers; exactly one wins.
    let n2: &'static UsedNonce = Box::leak(Box::new(used("ef".repeat(32), now, true)));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            let rec = AttestationRecord {
                verdict: &v,
                verified_pcrs: None,
                clock: None,
                events: &[],
                policy_epoch: None,
                nonce: Some(n2),
            };
            s.record_attestation("x1", rec).await.unwrap()
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if t.await.unwrap() == Recorded::Stored {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one server used the nonce");
}

fn used(nonce: String, now: chrono::DateTime<Utc>, exclusive: bool) -> UsedNonce {
    UsedNonce {
        nonce,
        expires_at: now + Duration::seconds(60),
        exclusive,
    }
}

/// Two servers on one database: the policy one server caches is used only
/// while no policy change was committed since, whichever server made it.
async fn policy_cache_follows_changes(url: &str) {
    let a = store::open(url).await.unwrap();
    let b = store::open(url).await.unwrap();
    let now = Utc::now()
        .duration_trunc(Duration::microseconds(1))
        .unwrap();
    a.register_host("pc1", now).await.unwrap();
    let own = store::own_whitelist("pc1");
    let put = |pcr0: &str, version, expected_head| PolicyChange::PutWhitelist {
        version: whitelist_version(&own, version, pcr0, false),
        expected_head,
    };
    let pcr0 = |p: &attestation_server::verify::HostPolicy| {
        p.whitelists[0].parts["platform"].pcrs[&HashAlg::Sha256][&0][0].clone()
    };
    // A change of pc1's own whitelist made through server B.
    let apply = |change: PolicyChange, n: u32| {
        let b = b.clone();
        async move {
            b.apply_policy_change(&change, &["pc1".into()], &[], &policy_event(n))
                .await
                .unwrap()
        }
    };
    let (first, second) = ("0a".repeat(32), "0b".repeat(32));
    assert_eq!(apply(put(&first, 1, None), 90).await, ApplyOutcome::Applied);
    let g1 = a.host("pc1").await.unwrap().unwrap().policy_generation;
    assert_eq!(pcr0(&a.host_policy_at("pc1", g1).await.unwrap()), first);

    // Server B changes the whitelist: the generation moves on, and server
    // A's next record read makes it load the new policy.
    assert_eq!(
        apply(put(&second, 2, Some(1)), 91).await,
        ApplyOutcome::Applied
    );
    let g2 = a.host("pc1").await.unwrap().unwrap().policy_generation;
    assert!(g2 > g1, "a policy change increments the generation");
    assert_eq!(pcr0(&a.host_policy_at("pc1", g2).await.unwrap()), second);
    // Within a generation the cache answers, not the database: a change
    // made behind the store's back (no generation bump) is not seen.
    let third = "0c".repeat(32);
    let sql = format!("UPDATE whitelist_heads SET body = REPLACE(body, '{second}', '{third}') WHERE name = '{own}'");
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query(&sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(&sql).execute(&mut c).await.unwrap();
    }
    assert_eq!(pcr0(&a.host_policy("pc1").await.unwrap()), third);
    assert_eq!(pcr0(&a.host_policy_at("pc1", g2).await.unwrap()), second);

    // A refused change (stale head) commits nothing, the generation neither.
    assert!(matches!(
        apply(put(&first, 2, Some(1)), 92).await,
        ApplyOutcome::Conflict { .. }
    ));
    assert_eq!(a.host("pc1").await.unwrap().unwrap().policy_generation, g2);
}

async fn suite(s: Arc<dyn Store>) {
    // Times are stored in microseconds.
    let now = Utc::now()
        .duration_trunc(Duration::microseconds(1))
        .unwrap();

    // Hosts, enrollments and identity pinning.
    assert!(s.register_host("n1", now).await.unwrap());
    assert!(!s.register_host("n1", now).await.unwrap());
    assert!(s.host("nobody").await.unwrap().is_none());
    let enrollment = |id: &str, host: &str, ek: &str, ak: &str| Enrollment {
        id: id.into(),
        host: host.into(),
        ek_public: ek.as_bytes().to_vec(),
        ek_name: format!("ek-{ek}"),
        ek_certified: true,
        ak_public: ak.as_bytes().to_vec(),
        ak_name: format!("ak-{ak}"),
        proof: "00ff".into(),
        created_at: now,
        expires_at: now + Duration::seconds(300),
    };
    let e1 = enrollment("e1", "n1", "A", "1");
    s.create_enrollment(&e1, &event("n1", 1)).await.unwrap();
    assert!(
        s.create_enrollment(&e1, &event("n1", 99)).await.is_err(),
        "ids are unique; the event rolls back with it"
    );
    // Another host cannot take it, and that does not use it up.
    let foreign = s.take_enrollment("e1", "n2", now).await.unwrap().unwrap();
    assert!(!foreign.used_before);
    assert_eq!(foreign.enrollment.host, "n1");
    let taken = s.take_enrollment("e1", "n1", now).await.unwrap().unwrap();
    assert_eq!(
        (taken.enrollment.clone(), taken.used_before),
        (e1.clone(), false)
    );
    assert!(
        s.take_enrollment("e1", "n1", now)
            .await
            .unwrap()
            .unwrap()
            .used_before
    );
    assert!(s
        .take_enrollment("nope", "n1", now)
        .await
        .unwrap()
        .is_none());
    let before = s.host("n1").await.unwrap().unwrap();
    assert!(!before.ak_activated, "enrolling alone activates nothing");
    assert_eq!(
        s.activate(&e1, &event("n1", 2)).await.unwrap(),
        ActivateOutcome::Activated
    );
    let h = s.host("n1").await.unwrap().unwrap();
    assert!(h.ak_activated && h.ek_certified && !h.rekey_allowed);
    assert_eq!(
        (h.ek_name.as_deref(), h.ak_name.as_deref()),
        (Some("ek-A"), Some("ak-1"))
    );
    assert_eq!(h.ak_public.as_deref(), Some(&b"1"[..]));
    assert_eq!(h.registered_at, now);
    assert_eq!(s.host_for_ek("ek-A").await.unwrap().as_deref(), Some("n1"));
    assert_eq!(s.host_for_ek("ek-B").await.unwrap(), None);
    // The same EK for a second host is refused; activation registers new hosts.
    assert_eq!(
        s.activate(&enrollment("e2", "n2", "A", "2"), &event("n2", 3))
            .await
            .unwrap(),
        ActivateOutcome::EkInUse { host: "n1".into() }
    );
    assert_eq!(
        s.activate(&enrollment("e3", "n2", "X", "x"), &event("n2", 7))
            .await
            .unwrap(),
        ActivateOutcome::Activated
    );
    // Re-key approval.
    assert!(s.allow_rekey("n1", &event("n1", 4)).await.unwrap());
    assert!(!s.allow_rekey("ghost", &event("ghost", 5)).await.unwrap());
    assert!(s.host("n1").await.unwrap().unwrap().rekey_allowed);
    assert_eq!(
        s.activate(&enrollment("e4", "n1", "B", "3"), &event("n1", 6))
            .await
            .unwrap(),
        ActivateOutcome::Activated
    );
    let h = s.host("n1").await.unwrap().unwrap();
    assert_eq!(
        (h.ek_name.as_deref(), h.rekey_allowed),
        (Some("ek-B"), false)
    );

    // Nonces: an exclusive use stores nothing once the nonce was used; a
    // refusal is stored whether or not it was.
    let first = trusted_at("n1", now);
    let replayed = HostTrust {
        verified_at: Some(now + Duration::seconds(1)),
        ..trusted_at("n1", now)
    };
    let with_nonce = |v, n| AttestationRecord {
        verdict: v,
        verified_pcrs: None,
        clock: None,
        events: &[],
        policy_epoch: None,
        nonce: Some(n),
    };
    let n = used("aa".repeat(32), now, true);
    assert_eq!(
        s.record_attestation("n1", with_nonce(&first, &n))
            .await
            .unwrap(),
        Recorded::Stored
    );
    assert_eq!(
        s.record_attestation("n1", with_nonce(&replayed, &n))
            .await
            .unwrap(),
        Recorded::NonceUsed
    );
    assert_eq!(
        s.host("n1").await.unwrap().unwrap().verdict,
        Some(first.clone())
    );
    let refusal = used("aa".repeat(32), now, false);
    assert_eq!(
        s.record_attestation("n1", with_nonce(&replayed, &refusal))
            .await
            .unwrap(),
        Recorded::Stored
    );
    assert_eq!(
        s.host("n1").await.unwrap().unwrap().verdict,
        Some(replayed.clone())
    );

    // Verdicts with their events, in one transaction.
    let verdict = HostTrust {
        host: "n1".into(),
        trust: Trust::Untrusted,
        verified_at: Some(now),
        expires_at: Some(now + Duration::seconds(30)),
        reasons: vec![Reason {
            step: "whitelist".into(),
            code: "no_whitelist".into(),
            message: "m".into(),
            pcr: None,
        }],
        policy: None,
    };
    let values = pcrs(&"00".repeat(32));
    let clock = ClockInfo {
        clock: 12_345,
        reset_count: 3,
        restart_count: 1,
        safe: true,
    };
    s.record_attestation(
        "n1",
        AttestationRecord {
            verdict: &verdict,
            verified_pcrs: Some(&values),
            clock: Some(clock),
            events: &[event("n1", 9)],
            policy_epoch: None,
            nonce: None,
        },
    )
    .await
    .unwrap();
    let h = s.host("n1").await.unwrap().unwrap();
    assert_eq!(h.verdict.as_ref(), Some(&verdict));
    assert_eq!(h.last_pcrs.as_ref(), Some(&values));
    assert_eq!(h.clock, Some(clock));
    let found = s
        .verdicts(&["n1".into(), "n2".into(), "ghost".into()])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found["n1"], verdict);

    // A policy change with its re-judged verdict (the full policy suite is below).
    let trusted = HostTrust {
        trust: Trust::Trusted,
        reasons: vec![],
        ..verdict.clone()
    };
    let own = whitelist_version("host:n1", 1, &"00".repeat(32), false);
    let done = s
        .apply_policy_change(
            &PolicyChange::PutWhitelist {
                version: own.clone(),
                expected_head: None,
            },
            &["n1".to_string()],
            &[Rejudged {
                host: "n1".into(),
                verdict: trusted.clone(),
            }],
            &event("n1", 10),
        )
        .await
        .unwrap();
    assert_eq!(done, ApplyOutcome::Applied);
    let h = s.host("n1").await.unwrap().unwrap();
    assert_eq!(h.verdict, Some(trusted));
    assert_eq!(s.host_policy("n1").await.unwrap().whitelists, vec![own]);

    // Events: ordered, with a per-sink cursor.
    s.record_event(&event("n2", 11)).await.unwrap();
    let all = s.events_after(0, 100).await.unwrap();
    let ns: Vec<String> = all.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(
        ns,
        ["1", "2", "7", "4", "6", "9", "10", "11"].map(|n| format!("{{\"n\":{n}}}")),
        "events of committed changes only, in commit order"
    );
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(s.sink_cursor("file").await.unwrap(), 0);
    s.set_sink_cursor("file", all[2].0).await.unwrap();
    assert_eq!(s.sink_cursor("file").await.unwrap(), all[2].0);
    assert_eq!(s.events_after(all[2].0, 2).await.unwrap().len(), 2);
    let n1_events = s.host_events("n1", 3).await.unwrap();
    assert_eq!(
        n1_events,
        ["6", "9", "10"].map(|n| format!("{{\"n\":{n}}}")),
        "newest three, oldest first"
    );

    // Pruning removes only expired used nonces.
    assert_eq!(s.prune_challenges(now).await.unwrap(), 0);
    assert_eq!(
        s.prune_challenges(now + Duration::seconds(61))
            .await
            .unwrap(),
        1
    );
    s.ping().await.unwrap();

    // ---- Scheduler integration (issue 6): subscribers and the expiry scan.
    let sub = store::Subscriber {
        id: "sub-1".into(),
        url: "https://sched.example/hook".into(),
        secret: Some("s".into()),
        created_at: now,
    };
    s.add_subscriber(&sub).await.unwrap();
    s.add_subscriber(&store::Subscriber {
        id: "sub-2".into(),
        secret: None,
        created_at: now + Duration::seconds(1),
        ..sub.clone()
    })
    .await
    .unwrap();
    let subs = s.subscribers().await.unwrap();
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0], sub);
    assert_eq!(subs[1].secret, None);
    assert!(s.delete_subscriber("sub-1").await.unwrap());
    assert!(!s.delete_subscriber("sub-1").await.unwrap());
    assert_eq!(s.subscribers().await.unwrap().len(), 1);
    let stored = s.verdicts(&["n1".to_string()]).await.unwrap();
    let exp = stored["n1"].expires_at.unwrap();
    let lapsing = s
        .verdicts_expiring(exp - Duration::seconds(1), exp)
        .await
        .unwrap();
    assert_eq!(lapsing.len(), 1);
    assert_eq!(lapsing[0].host, "n1");
    // The window is half-open: (after, until].
    assert!(s
        .verdicts_expiring(exp, exp + Duration::seconds(1))
        .await
        .unwrap()
        .is_empty());

    // Operations (issue 8): hosts by current trust, as readers are told.
    let at = Utc::now();
    let before = s.trust_counts(at).await.unwrap();
    let verdict = |host: &str, trust, expires_at| HostTrust {
        host: host.into(),
        trust,
        verified_at: Some(at - Duration::seconds(60)),
        expires_at: Some(expires_at),
        reasons: vec![],
        policy: None,
    };
    for (host, trust, expires_at) in [
        ("tc-trusted", Trust::Trusted, at + Duration::seconds(60)),
        ("tc-untrusted", Trust::Untrusted, at + Duration::seconds(60)),
        ("tc-expired", Trust::Trusted, at - Duration::seconds(1)),
    ] {
        s.register_host(host, at).await.unwrap();
        let v = verdict(host, trust, expires_at);
        let rec = AttestationRecord::verdict_only(&v);
        s.record_attestation(host, rec).await.unwrap();
    }
    s.register_host("tc-never-attested", at).await.unwrap();
    let after = s.trust_counts(at).await.unwrap();
    assert_eq!(
        (
            after.trusted - before.trusted,
            after.untrusted - before.untrusted,
            after.unknown - before.unknown
        ),
        (1, 1, 2),
        "{before:?} -> {after:?}"
    );
    // A day on, every verdict has lapsed: all hosts are unknown.
    let later = s.trust_counts(at + Duration::hours(24)).await.unwrap();
    assert_eq!((later.trusted, later.untrusted), (0, 0));
    assert_eq!(
        later.unknown,
        after.trusted + after.untrusted + after.unknown
    );
}

/// Group commit (`store::writer`): many writes at once share transactions;
/// a write that fails (a duplicate event id) fails alone; a verdict judged
/// against a superseded policy is not stored, nor its event; every verdict
/// and event that was acknowledged is stored, and each server's hash chain
/// is unbroken across the batches.
/// A trusted verdict on `host` at `at`, valid for a minute.
fn trusted_at(host: &str, at: chrono::DateTime<Utc>) -> HostTrust {
    HostTrust {
        host: host.into(),
        trust: Trust::Trusted,
        verified_at: Some(at),
        expires_at: Some(at + Duration::seconds(60)),
        reasons: vec![],
        policy: None,
    }
}

/// A TPM clock reading of the first boot.
fn clock_at(clock: u64) -> ClockInfo {
    ClockInfo {
        clock,
        reset_count: 1,
        restart_count: 0,
        safe: true,
    }
}

async fn group_commit_suite(s: Arc<dyn Store>) {
    use attestation_server::audit::chain;
    let at = Utc::now()
        .duration_trunc(Duration::microseconds(1))
        .unwrap();
    const N: usize = 64;
    let hosts: Vec<String> = (0..N).map(|i| format!("gc-{i}")).collect();
    for h in &hosts {
        s.register_host(h, at).await.unwrap();
    }
    let cadf = |server: &str, n: usize| NewEvent {
        id: uuid::Uuid::new_v4().to_string(),
        time: at,
        host: None,
        body: format!("{{\"observer\":{{\"name\":\"{server}\"}},\"n\":{n}}}"),
    };
    let stored_before = s.stored_events_after(0, 100_000).await.unwrap().len();
    let duplicate = cadf("gc-a", 0);
    s.record_event(&duplicate).await.unwrap();
    let epoch = s.host("gc-0").await.unwrap().unwrap().policy_epoch;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, host) in hosts.iter().enumerate() {
        let (store, host) = (s.clone(), host.clone());
        // Two servers' chains interleave in the same batches.
        let events = vec![cadf(if i % 2 == 0 { "gc-a" } else { "gc-b" }, i + 1)];
        let nonce = used(format!("gc-nonce-{i}"), at, true);
        tasks.spawn(async move {
            let v = trusted_at(&host, at);
            let rec = AttestationRecord {
                verdict: &v,
                verified_pcrs: Some(&pcrs(&"aa".repeat(32))),
                clock: Some(clock_at(1000 + i as u64)),
                events: &events,
                // One verdict was judged against a policy that changed since.
                policy_epoch: Some(if i == 7 { epoch + 100 } else { epoch }),
                nonce: Some(&nonce),
            };
            let recorded = store.record_attestation(&host, rec).await;
            (
                "record",
                i,
                recorded.map(|r| usize::from(r == Recorded::Stored)),
            )
        });
    }
    {
        let s = s.clone();
        let duplicate = duplicate.clone();
        tasks.spawn(async move { ("duplicate", 0, s.record_event(&duplicate).await.map(|_| 1)) });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.unwrap());
    }
    for (what, i, result) in &outcomes {
        match (*what, *i) {
            ("duplicate", _) => assert!(result.is_err(), "a duplicate event id is refused"),
            ("record", 7) => assert_eq!(result.as_ref().unwrap(), &0, "stale epoch: not stored"),
            (_, i) => assert_eq!(result.as_ref().unwrap(), &1, "{what} {i}: {result:?}"),
        }
    }
    let verdicts = s.verdicts(&hosts).await.unwrap();
    assert_eq!(verdicts.len(), N - 1, "every verdict but the stale one");
    assert!(!verdicts.contains_key("gc-7"));
    assert!(verdicts.values().all(|v| v.trust == Trust::Trusted));
    let h = s.host("gc-5").await.unwrap().unwrap();
    assert_eq!(h.clock.map(|c| c.clock), Some(1005));
    assert_eq!(h.last_pcrs, Some(pcrs(&"aa".repeat(32))));
    assert!(s.host("gc-7").await.unwrap().unwrap().clock.is_none());
    // Nothing stored, the nonce left unused: judged again, the verdict is
    // stored with it; a use of another host's stored nonce is not.
    let v7 = trusted_at("gc-7", at);
    let again = |n| AttestationRecord {
        verdict: &v7,
        verified_pcrs: None,
        clock: None,
        events: &[],
        policy_epoch: Some(epoch),
        nonce: Some(n),
    };
    let n7 = used("gc-nonce-7".into(), at, true);
    let n6 = used("gc-nonce-6".into(), at, true);
    assert_eq!(
        s.record_attestation("gc-7", again(&n7)).await.unwrap(),
        Recorded::Stored
    );
    assert_eq!(
        s.record_attestation("gc-7", again(&n6)).await.unwrap(),
        Recorded::NonceUsed
    );
    // The duplicate's first copy plus one event per stored verdict.
    let stored = s.stored_events_after(0, 100_000).await.unwrap();
    assert_eq!(stored.len() - stored_before, 1 + (N - 1));
    let export: String = stored
        .iter()
        .map(|e| serde_json::to_string(&chain::ExportRecord::event(e)).unwrap() + "\n")
        .collect();
    let report = chain::verify(&export, None);
    assert_eq!(report.problem, None, "{report:?}");
    for server in ["gc-a", "gc-b"] {
        let head = s.chain_head(server).await.unwrap().unwrap();
        let last = stored.iter().rfind(|e| e.server == server).unwrap();
        assert_eq!(
            (head.seq, &head.hash, head.count),
            (last.seq, &last.hash, last.chain_index)
        );
    }

    // One host's verdicts and one nonce's uses arriving together (they
    // share batches): every verdict without the nonce is stored in turn,
    // and exactly one use of the nonce is.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16u64 {
        let store = s.clone();
        tasks.spawn(async move {
            let v = trusted_at("gc-0", at);
            let rec = |nonce| AttestationRecord {
                verdict: &v,
                verified_pcrs: None,
                clock: Some(clock_at(2000 + i)),
                events: &[],
                policy_epoch: None,
                nonce,
            };
            let stored = store.record_attestation("gc-0", rec(None)).await.unwrap();
            let same = used("gc-same".into(), at, true);
            let with_nonce = store
                .record_attestation("gc-1", rec(Some(&same)))
                .await
                .unwrap();
            (stored, with_nonce)
        });
    }
    let mut fresh = 0;
    while let Some(joined) = tasks.join_next().await {
        let (stored, with_nonce) = joined.unwrap();
        assert_eq!(stored, Recorded::Stored);
        if with_nonce == Recorded::Stored {
            fresh += 1;
        } else {
            assert_eq!(with_nonce, Recorded::NonceUsed);
        }
    }
    assert_eq!(fresh, 1, "one use of the nonce is stored");
    let clock = s.host("gc-0").await.unwrap().unwrap().clock.unwrap().clock;
    assert!((2000..2016).contains(&clock), "{clock}");
}

#[tokio::test]
async fn storage_suite_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    suite(store::open(&url).await.unwrap()).await;
    policy_suite(store::open(&url).await.unwrap()).await;
    group_commit_suite(store::open(&url).await.unwrap()).await;
    policy_cache_follows_changes(&url).await;
    // Migrations run once: reopening the same file works and keeps data.
    let again = store::open(&url).await.unwrap();
    assert!(again.host("n1").await.unwrap().is_some());
}

#[tokio::test]
async fn storage_suite_on_postgres() {
    let base = std::env::var("ATTEST_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut admin = match sqlx::PgConnection::connect(&base).await {
        Ok(c) => c,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("\n!!! SKIPPING the PostgreSQL storage suite: cannot connect to {base}: {e}\n!!! (under CI=true this fails)\n");
            return;
        }
        Err(e) => panic!("PostgreSQL is required under CI=true: {base}: {e}"),
    };
    let db = format!("attest_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{db}"),
        None => panic!("ATTEST_TEST_PG_URL needs a database path"),
    };
    let result = tokio::spawn(async move {
        suite(store::open(&url).await.unwrap()).await;
        policy_suite(store::open(&url).await.unwrap()).await;
        group_commit_suite(store::open(&url).await.unwrap()).await;
        two_servers_one_database(&url).await;
        policy_cache_follows_changes(&url).await;
        // Reopening (a second server starting) finds the schema migrated.
        let again = store::open(&url).await.unwrap();
        assert!(again.host("n1").await.unwrap().is_some());
    })
    .await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}
