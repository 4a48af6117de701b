//! IMA verification throughput: an ima-ng list with SHA-256 file digests
//! against a runtime policy of 100,000 paths, PCR 10 replayed in the SHA-256
//! bank. Target: at least 1,000,000 entries/s on one core.
//!
//! Groups: `hash/*` (sha2 vs ring on IMA-sized inputs), `ima/*` (parse,
//! verify, both; `verify_ascii_parallel` on every core), `threshold/*`
//! (one thread vs all cores, 1,000 to 64,000 entries), `policy/*` (compiling the policy). With IMA_BENCH_LOG and
//! IMA_BENCH_POLICY (Keylime JSON) set, `keylime_input/*` runs the files
//! bench/ima-vs-keylime.sh generated (IMA_BENCH_PCR10: the expected
//! SHA-256 PCR 10, checked once).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use proto::ima::{self, ImaState, Template};
use proto::runtime_policy::{PolicyDocument, RuntimePolicy};
use proto::HashAlg;
use sha2::Digest;

const PATHS: usize = 100_000;
const ENTRIES: usize = 100_000;

/// The same shape as bench/ima-gen.py: 1% of entries under /tmp (excluded).
fn generate() -> (String, RuntimePolicy) {
    let mut doc = PolicyDocument {
        excludes: vec!["/tmp/.*".into(), "/var/log/.*".into()],
        ..Default::default()
    };
    let mut entries = Vec::with_capacity(ENTRIES);
    for i in 0..ENTRIES {
        let path = if i % 100 == 99 {
            format!("/tmp/session-{i}/scratch")
        } else {
            format!(
                "/usr/lib/gen/d{:03}/file-{}.so",
                (i % PATHS) % 1000,
                i % PATHS
            )
        };
        let digest = HashAlg::Sha256.hash(&[path.as_bytes()]);
        if !path.starts_with("/tmp/") {
            doc.digests.insert(path.clone(), vec![hex::encode(&digest)]);
        }
        entries
            .push(ima::make_entry(Template::ImaNg, HashAlg::Sha256, &digest, &path, &[]).unwrap());
    }
    let mut i = 0;
    while doc.digests.len() < PATHS {
        let path = format!("/opt/unused/file-{i}");
        let d = HashAlg::Sha256.hash(&[path.as_bytes()]);
        doc.digests.insert(path, vec![hex::encode(d)]);
        i += 1;
    }
    (ima::encode_ascii(&entries), RuntimePolicy::new(doc))
}

fn hashes(c: &mut Criterion) {
    // ima-ng template data of a typical path is ~90 bytes; an extend hashes 64.
    for len in [64usize, 96] {
        let input = vec![0x5au8; len];
        let mut g = c.benchmark_group(format!("hash/{len}B"));
        g.bench_function("sha2::Sha256", |b| {
            b.iter(|| black_box(sha2::Sha256::digest(black_box(&input))))
        });
        g.bench_function("ring SHA256", |b| {
            b.iter(|| {
                black_box(ring::digest::digest(
                    &ring::digest::SHA256,
                    black_box(&input),
                ))
            })
        });
        g.bench_function("sha1::Sha1", |b| {
            b.iter(|| black_box(sha1::Sha1::digest(black_box(&input))))
        });
        g.bench_function("ring SHA1", |b| {
            b.iter(|| {
                black_box(ring::digest::digest(
                    &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                    black_box(&input),
                ))
            })
        });
        g.finish();
    }
}

fn run_list(
    c: &mut Criterion,
    group: &str,
    log: &[u8],
    policy: &RuntimePolicy,
    pcr_file: Option<&str>,
) {
    policy.validate().unwrap();
    let entries = ima::parse_ascii(log).unwrap();
    let n = entries.len() as u64;
    let start = ImaState::new(None, None, &[HashAlg::Sha256]);
    let out = ima::verify(&entries, policy, &start, HashAlg::Sha256).unwrap();
    assert!(out.ok(), "{:?}", out.failures.first());
    let par = ima::verify_ascii_parallel(log, 1, policy, &start, HashAlg::Sha256, 0).unwrap();
    assert_eq!(par, out);
    // The side-by-side passes the quoted value Keylime also checks.
    if let Some(pcr_file) = pcr_file {
        let quoted = hex::decode(std::fs::read_to_string(pcr_file).unwrap().trim()).unwrap();
        out.new_state
            .matches_quote(HashAlg::Sha256, &quoted)
            .unwrap();
    }
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(n));
    g.sample_size(20);
    g.bench_function("parse_ascii", |b| {
        b.iter(|| black_box(ima::parse_ascii(black_box(log)).unwrap()))
    });
    g.bench_function("verify (parsed, sha256 bank)", |b| {
        b.iter(|| {
            black_box(ima::verify(black_box(&entries), policy, &start, HashAlg::Sha256).unwrap())
        })
    });
    g.bench_function("parse+verify (sha256 bank)", |b| {
        b.iter(|| {
            let e = ima::parse_ascii(black_box(log)).unwrap();
            black_box(ima::verify(&e, policy, &start, HashAlg::Sha256).unwrap())
        })
    });
    // What the server runs: its log step (parse, replay to the quote,
    // template hashes once), then its whitelist step (the policy only);
    // on one thread, and on every core as the server does.
    let quoted = out.new_state.pcr10(HashAlg::Sha256).unwrap().to_vec();
    let server_steps = |threads: usize| {
        let q = [(HashAlg::Sha256, quoted.as_slice())];
        let r = ima::replay_ascii_to_quote(black_box(log), 1, &start, &q, threads).unwrap();
        ima::judge_replayed(&r, policy, threads).unwrap()
    };
    assert_eq!(server_steps(1), out);
    assert_eq!(server_steps(0), out);
    g.bench_function(
        "server steps (replay_ascii_to_quote, judge_replayed)",
        |b| b.iter(|| black_box(server_steps(1))),
    );
    g.bench_function("server steps (all cores)", |b| {
        b.iter(|| black_box(server_steps(0)))
    });
    g.bench_function("verify_ascii (streaming)", |b| {
        b.iter(|| {
            black_box(
                ima::verify_ascii(black_box(log), 1, policy, &start, HashAlg::Sha256).unwrap(),
            )
        })
    });
    g.bench_function("verify_ascii_parallel (all cores)", |b| {
        b.iter(|| {
            black_box(
                ima::verify_ascii_parallel(black_box(log), 1, policy, &start, HashAlg::Sha256, 0)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

fn ima_bench(c: &mut Criterion) {
    let (log, policy) = generate();
    run_list(
        c,
        "ima/100k-entries-100k-paths",
        log.as_bytes(),
        &policy,
        None,
    );

    // Where threads start to pay: short lists, one thread vs all cores.
    let cores = ima::parallel_threads(0);
    let mut g = c.benchmark_group("threshold");
    g.sample_size(20);
    let start = ImaState::new(None, None, &[HashAlg::Sha256]);
    for n in [1000usize, 4000, 16000, 64000] {
        let end = log
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'\n')
            .nth(n - 1)
            .map_or(log.len(), |(i, _)| i + 1);
        let part = &log.as_bytes()[..end];
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n} entries ({} KiB), 1 thread", end / 1024), |b| {
            b.iter(|| {
                black_box(ima::verify_ascii(part, 1, &policy, &start, HashAlg::Sha256).unwrap())
            })
        });
        g.bench_function(format!("{n} entries, {cores} threads"), |b| {
            b.iter(|| {
                black_box(
                    ima::verify_ascii_on_threads(part, 1, &policy, &start, HashAlg::Sha256, cores)
                        .unwrap(),
                )
            })
        });
    }
    g.finish();

    let doc = policy.document().clone();
    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.bench_function("compile 100k paths", |b| {
        b.iter(|| {
            let p = RuntimePolicy::new(doc.clone());
            p.validate().unwrap();
            black_box(p)
        })
    });
    g.finish();

    if let (Ok(log_path), Ok(policy_path)) = (
        std::env::var("IMA_BENCH_LOG"),
        std::env::var("IMA_BENCH_POLICY"),
    ) {
        let log = std::fs::read(&log_path).unwrap();
        let policy =
            RuntimePolicy::from_keylime_json(&std::fs::read(&policy_path).unwrap()).unwrap();
        let pcr = std::env::var("IMA_BENCH_PCR10").ok();
        run_list(c, "keylime_input", &log, &policy, pcr.as_deref());
    }
}

criterion_group!(benches, hashes, ima_bench);
criterion_main!(benches);
