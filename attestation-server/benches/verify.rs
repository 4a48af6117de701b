//! Quote verification throughput on one core: the full verifier (decode,
//! signature, nonce, selection, pcrDigest, whitelist, verdict) against the
//! bare signature check, which is its floor. Inputs are the recorded swtpm
//! quotes in fixtures/ (RSA-2048 RSASSA and ECC P-256 ECDSA AKs).
//!
//! Run: `cargo bench -p attestation-server --bench verify`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::verify::{self, Expected, IssuedChallenge, Policy};
use base64::Engine;
use chrono::{Duration, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proto::tpm::{Attest, Public, Signature};
use proto::wire::{Evidence, PcrValues, Whitelist};
use std::hint::black_box;
use std::path::PathBuf;

fn bench(c: &mut Criterion) {
    for (kind, label) in [("rsa", "rsa2048"), ("ecc", "ecc_p256")] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/quotes")
            .join(kind);
        let read = |f: &str| std::fs::read(dir.join(f)).expect("fixture");
        let ak = Public::decode(&read("ak.pub")).expect("ak");
        let msg = read("quote.msg");
        let sig_bytes = read("quote.sig");
        let pcrs: PcrValues = serde_json::from_slice(&read("pcrs.json")).expect("pcrs");
        let attest = Attest::decode(&msg).expect("attest");
        let b64 = base64::engine::general_purpose::STANDARD;
        let evidence = Evidence {
            nonce: String::from_utf8(read("nonce.hex"))
                .expect("nonce")
                .trim()
                .to_string(),
            attest: b64.encode(&msg),
            signature: b64.encode(&sig_bytes),
            pcrs: pcrs.clone(),
            uefi_log: None,
            ima: None,
        };
        let whitelist = Whitelist {
            pcrs: pcrs
                .iter()
                .map(|(b, v)| (*b, v.iter().map(|(i, h)| (*i, vec![h.clone()])).collect()))
                .collect(),
        };
        let now = Utc::now();
        let challenge = IssuedChallenge {
            selection: Some(attest.quote.pcr_select.clone()),
            expires_at: now + Duration::hours(1),
        };
        let expected = Expected {
            host: "node1",
            ak: &ak,
            challenge: Some(&challenge),
            last_clock: Some(attest.clock_info),
        };
        let host_policy = attestation_server::verify::HostPolicy::own("node1", &whitelist);
        let policy = Policy {
            host_policy: &host_policy,
            freshness: Duration::seconds(60),
        };
        let signature = Signature::decode(&sig_bytes).expect("signature");

        let mut g = c.benchmark_group(label);
        g.throughput(Throughput::Elements(1));
        g.bench_function("bare_signature", |b| {
            b.iter(|| {
                verify::verify_signature(black_box(&ak), black_box(&signature), black_box(&msg))
                    .expect("valid")
            })
        });
        g.bench_function("full_verification", |b| {
            b.iter(|| verify::verify(black_box(&evidence), &expected, &policy, now).expect("valid"))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
