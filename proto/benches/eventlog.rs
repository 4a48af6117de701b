//! Parse + replay of a real 101-event UEFI event log (fixtures/eventlog/
//! mb_log.bin, SHA-256 bank). Target: under 100 µs per log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use proto::eventlog;
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/eventlog")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn bench(c: &mut Criterion) {
    let log = fixture("mb_log.bin");
    let parsed = eventlog::parse(&log).unwrap();
    assert_eq!(parsed.events.len(), 101);
    c.bench_function("eventlog parse+replay (101 events, sha256)", |b| {
        b.iter(|| {
            let l = eventlog::parse(black_box(&log)).unwrap();
            black_box(l.replay())
        })
    });
    c.bench_function("eventlog parse only (101 events)", |b| {
        b.iter(|| black_box(eventlog::parse(black_box(&log)).unwrap()))
    });
    let two_banks = fixture("create-mb-policy.bin");
    c.bench_function("eventlog parse+replay (120 events, sha1+sha256)", |b| {
        b.iter(|| {
            let l = eventlog::parse(black_box(&two_banks)).unwrap();
            black_box(l.replay())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
