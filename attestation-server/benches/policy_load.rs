//! The policy work of one attestation for a host whose whitelist carries a
//! runtime (IMA) policy of 100,000 paths: what the challenge and the
//! evidence handlers do before any IMA entry is judged (load the host's
//! policy from the store, name the runtime policy, compile it).
//!
//! Run: `cargo bench -p attestation-server --bench policy_load`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::store::{self, NewEvent, PolicyChange, Store};
use attestation_server::verify::{self, LogNeeds};
use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion};
use proto::policy::{Part, WhitelistVersion};
use proto::runtime_policy::PolicyDocument;
use std::collections::BTreeMap;
use std::sync::Arc;

const PATHS: usize = 100_000;

fn runtime_doc() -> PolicyDocument {
    let digests = (0..PATHS)
        .map(|i| {
            (
                format!("/usr/lib/pkg{}/lib{i}.so", i % 997),
                vec![format!("sha256:{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15)],
            )
        })
        .collect();
    PolicyDocument {
        digests,
        excludes: vec!["/tmp/.*".into()],
        ..PolicyDocument::default()
    }
}

async fn setup(dir: &std::path::Path) -> Arc<dyn Store> {
    let url = format!("sqlite://{}", dir.join("bench.db").display());
    let s = store::open(&url).await.unwrap();
    s.register_host("node1", Utc::now()).await.unwrap();
    let version = WhitelistVersion {
        name: store::own_whitelist("node1"),
        version: 1,
        description: None,
        parts: BTreeMap::from([(
            "runtime".to_string(),
            Part {
                runtime: Some(runtime_doc().into()),
                ..Part::default()
            },
        )]),
        deleted: false,
        created_at: Utc::now(),
        created_by: "bench".into(),
    };
    let event = NewEvent {
        id: uuid::Uuid::new_v4().to_string(),
        time: Utc::now(),
        host: None,
        body: "{}".into(),
    };
    s.apply_policy_change(
        &PolicyChange::PutWhitelist {
            version,
            expected_head: None,
        },
        &["node1".to_string()],
        &[],
        &event,
    )
    .await
    .unwrap();
    s
}

/// The challenge handler's and the evidence handler's policy work.
async fn attestation_policy_work(s: &dyn Store) -> usize {
    let at_challenge = s.host_policy("node1").await.unwrap();
    let needs = LogNeeds::of(&at_challenge);
    let at_evidence = s.host_policy("node1").await.unwrap();
    let mut compiled = 0;
    for part in at_evidence.whitelists.iter().flat_map(|w| w.parts.values()) {
        if let Some(rp) = &part.runtime {
            assert!(needs.runtime.contains(&verify::runtime_fingerprint(rp)));
            rp.validate().unwrap();
            compiled += 1;
        }
    }
    compiled
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = rt.block_on(setup(dir.path()));
    assert_eq!(rt.block_on(attestation_policy_work(&*s)), 1);
    let mut g = c.benchmark_group("policy_load_100k_paths");
    g.sample_size(10);
    g.bench_function("challenge_and_evidence", |b| {
        b.iter(|| rt.block_on(attestation_policy_work(&*s)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
