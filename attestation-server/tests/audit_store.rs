//! The audit part of the storage layer on SQLite and PostgreSQL: concurrent
//! appends keep one unforked hash chain per server, checkpoints and trust
//! states round-trip, filters match, retention prunes only what every sink
//! received. PostgreSQL runs on 127.0.0.1:5432 (or ATTEST_TEST_PG_URL).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::audit::{self, chain};
use attestation_server::store::{self, AttestationRecord, EventFilter, Store, TrustChange};
use chrono::{Duration, Utc};
use proto::cadf::Resource;
use proto::wire::{HostTrust, Trust};
use sqlx::Connection;
use std::sync::Arc;

async fn suite(s: Arc<dyn Store>) {
    // Two servers share the database; each appends from 4 tasks at once.
    let mut tasks = Vec::new();
    for server in ["srv-a", "srv-b"] {
        for t in 0..4 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..15 {
                    let ev = audit::event(
                        server,
                        audit::client("admin", &format!("admin{t}")),
                        Resource::host(&format!("h{t}-{i}")),
                        "create",
                        if i % 3 == 0 { "failure" } else { "success" },
                        None,
                        Utc::now() - Duration::days(if i < 5 { 30 } else { 0 }),
                        None,
                    );
                    s.record_event(&ev).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = s.stored_events_after(0, 10_000).await.unwrap();
    assert_eq!(all.len(), 120);
    for server in ["srv-a", "srv-b"] {
        let mine: Vec<_> = all.iter().filter(|e| e.server == server).collect();
        assert_eq!(mine.len(), 60);
        let mut prev = chain::GENESIS.to_string();
        for (i, e) in mine.iter().enumerate() {
            assert_eq!(e.chain_index, i as i64 + 1, "{server} seq {}", e.seq);
            assert_eq!(
                e.prev_hash, prev,
                "{server}: the chain forked at seq {}",
                e.seq
            );
            let body: serde_json::Value = serde_json::from_str(&e.body).unwrap();
            assert_eq!(e.hash, chain::link(&prev, &chain::canonical_json(&body)));
            prev = e.hash.clone();
        }
        let head = s.chain_head(server).await.unwrap().unwrap();
        assert_eq!((head.count, head.hash.as_str()), (60, prev.as_str()));
    }

    // Filters.
    let f = EventFilter {
        initiator: Some("admin2".into()),
        outcome: Some("failure".into()),
        ..EventFilter::default()
    };
    let found = s.query_events(&f, 0, 1000).await.unwrap();
    assert_eq!(found.len(), 10); // 5 failures per task, two servers
    let f = EventFilter {
        target: Some("h1-7".into()),
        ..EventFilter::default()
    };
    assert_eq!(s.query_events(&f, 0, 1000).await.unwrap().len(), 2);
    let f = EventFilter {
        until: Some(Utc::now() - Duration::days(1)),
        ..EventFilter::default()
    };
    assert_eq!(s.query_events(&f, 0, 1000).await.unwrap().len(), 40);
    let page = s
        .query_events(&EventFilter::default(), all[9].seq, 5)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        all[10..15].iter().map(|e| e.seq).collect::<Vec<_>>()
    );

    // Backlog of a sink that has seen the first 100.
    s.set_sink_cursor("webhook", all[99].seq).await.unwrap();
    let b = s.event_backlog(all[99].seq).await.unwrap();
    assert_eq!(b.count, 20);
    assert_eq!(b.newest_seq, all[119].seq);

    // Retention: old events are pruned only up to what was delivered.
    let pruned = s
        .prune_events(Utc::now() - Duration::days(7), all[19].seq)
        .await
        .unwrap();
    let left = s.stored_events_after(0, 10_000).await.unwrap();
    assert_eq!(left.len() as u64, 120 - pruned);
    // The very first event is old (each task starts with old ones).
    assert!(pruned > 0 && pruned <= 20, "{pruned}");
    assert!(left
        .iter()
        .all(|e| e.seq > all[19].seq || e.time > Utc::now() - Duration::days(7)));

    // Checkpoints and trust states.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .unwrap();
    let key = chain::SigningKey::from_pkcs8(pkcs8.as_ref()).unwrap();
    let head = s.chain_head("srv-a").await.unwrap().unwrap();
    let c = key
        .checkpoint("srv-a", head.seq, head.count, &head.hash, Utc::now())
        .unwrap();
    s.insert_checkpoint(&c).await.unwrap();
    let back = s.last_checkpoint("srv-a").await.unwrap().unwrap();
    assert_eq!(back.signature, c.signature);
    assert_eq!(back.count, 60);
    assert!(s.last_checkpoint("srv-b").await.unwrap().is_none());
    trust_scan(&s).await;
}

/// The trust scanner's queries: the database finds the hosts whose state
/// changed (new verdict, other trust, expiry), a scan records them in one
/// transaction, and a change recorded already (by another server) is not
/// recorded, nor its event appended, twice.
async fn trust_scan(s: &Arc<dyn Store>) {
    let now = Utc::now();
    for (host, trust, expires) in [
        ("t1", Trust::Trusted, now + Duration::minutes(10)),
        ("t2", Trust::Untrusted, now + Duration::minutes(10)),
        ("t3", Trust::Trusted, now - Duration::seconds(1)),
    ] {
        s.register_host(host, now).await.unwrap();
        let v = HostTrust {
            host: host.into(),
            trust,
            verified_at: Some(now),
            expires_at: Some(expires),
            reasons: vec![],
            policy: None,
        };
        let rec = AttestationRecord::verdict_only(&v);
        s.record_attestation(host, rec).await.unwrap();
    }
    let change = |host: &str, before: Option<&str>, state: &str| TrustChange {
        host: host.into(),
        before: before.map(String::from),
        state: state.into(),
    };
    let found = s.trust_changes(now, "", 100).await.unwrap();
    assert_eq!(
        found,
        vec![
            change("t1", None, "trusted"),
            change("t2", None, "untrusted"),
            change("t3", None, "stale"),
        ]
    );
    assert_eq!(s.trust_changes(now, "", 2).await.unwrap(), found[..2]);
    assert_eq!(s.trust_changes(now, "t1", 2).await.unwrap(), found[1..]);
    assert!(s.trust_changes(now, "t3", 2).await.unwrap().is_empty());

    let with_events = |changes: &[TrustChange], at| -> Vec<(TrustChange, store::NewEvent)> {
        changes
            .iter()
            .map(|c| {
                let ev =
                    audit::trust_change_event("srv-c", &c.host, c.before.as_deref(), &c.state, at);
                (c.clone(), ev)
            })
            .collect()
    };
    let events_of_c = |s: Arc<dyn Store>| async move {
        s.chain_head("srv-c").await.unwrap().map_or(0, |h| h.count)
    };
    let batch = with_events(&found, now);
    let recorded = s.record_trust_changes(&batch).await.unwrap();
    assert_eq!(recorded, vec!["t1", "t2", "t3"]);
    assert_eq!(events_of_c(s.clone()).await, 3);
    let states = s.trust_states().await.unwrap();
    assert_eq!(
        (
            states["t1"].as_str(),
            states["t2"].as_str(),
            states["t3"].as_str()
        ),
        ("trusted", "untrusted", "stale")
    );
    assert!(s.trust_changes(now, "", 100).await.unwrap().is_empty());
    // The same changes again (a second server's scan, late): nothing.
    assert!(s.record_trust_changes(&batch).await.unwrap().is_empty());
    assert_eq!(events_of_c(s.clone()).await, 3);

    // Eleven minutes on, t1 and t2 lapse; two scans race to report it.
    let later = now + Duration::minutes(11);
    let found = s.trust_changes(later, "", 100).await.unwrap();
    assert_eq!(
        found,
        vec![
            change("t1", Some("trusted"), "stale"),
            change("t2", Some("untrusted"), "stale"),
        ]
    );
    let batch = with_events(&found, later);
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let (s, batch) = (s.clone(), batch.clone());
            tokio::spawn(async move { s.record_trust_changes(&batch).await.unwrap() })
        })
        .collect();
    let mut all = Vec::new();
    for r in racers {
        all.extend(r.await.unwrap());
    }
    all.sort();
    assert_eq!(all, vec!["t1", "t2"], "each change recorded once");
    assert_eq!(events_of_c(s.clone()).await, 5);
    assert!(s.trust_changes(later, "", 100).await.unwrap().is_empty());
    // A scan that read t1 as trusted, recording after another server moved
    // it on (trusted -> stale, above): nothing, the newer state stays.
    let late = with_events(&[change("t1", Some("trusted"), "untrusted")], later);
    assert!(s.record_trust_changes(&late).await.unwrap().is_empty());
    // Nor a host another server reported first, as new.
    let late = with_events(&[change("t2", None, "trusted")], later);
    assert!(s.record_trust_changes(&late).await.unwrap().is_empty());
    let states = s.trust_states().await.unwrap();
    assert_eq!(
        (states["t1"].as_str(), states["t2"].as_str()),
        ("stale", "stale")
    );
    assert_eq!(events_of_c(s.clone()).await, 5);
    assert!(s.record_trust_changes(&[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_store_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    suite(store::open(&url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_store_on_postgres() {
    let base = std::env::var("ATTEST_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut admin = match sqlx::PgConnection::connect(&base).await {
        Ok(c) => c,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("\n!!! SKIPPING the PostgreSQL audit suite: cannot connect to {base}: {e}\n");
            return;
        }
        Err(e) => panic!("PostgreSQL is required under CI=true: {base}: {e}"),
    };
    let db = format!("attest_audit_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{db}"),
        None => panic!("ATTEST_TEST_PG_URL needs a database path"),
    };
    let result = tokio::spawn(async move { suite(store::open(&url).await.unwrap()).await }).await;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}
