//! Scheduler query latency over TLS with connection reuse, the server on
//! one core: `POST /v1/trust/query` (mutual TLS, scheduler certificate) and
//! Nova's `PollHosts` (TLS, x-auth-blob) for 1, 100 and 1,000 hosts.
//! Sequential requests on one kept-alive connection; prints p50/p99 latency
//! and requests per second as a Markdown table (docs/benchmarks.md).
//!
//! Run: `cargo bench -p e2e-tests --bench scheduler_queries`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmark code

use chrono::{Duration, Utc};
use e2e_tests::{free_port, Pool};
use proto::wire::Trust;
use std::time::Instant;

const BLOB: &str = "bench-blob";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn measure(label: &str, n: usize, iterations: usize, mut call: impl AsyncFnMut() -> u16) {
    for _ in 0..20 {
        assert_eq!(call().await, 200);
    }
    let mut lat = Vec::with_capacity(iterations);
    let start = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        assert_eq!(call().await, 200);
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let total = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "| {label} | {n} | {:.2} | {:.2} | {:.0} |",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        iterations as f64 / total
    );
}

fn main() {
    // The server gets a runtime with one worker thread: "one core".
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let oat_port = free_port().unwrap();
    let pool = server_rt
        .block_on(Pool::start(&[("node1", "unused".into())], 30, |c| {
            c.oat.listen = Some(([127, 0, 0, 1], oat_port).into());
            c.oat.auth_blob.0 = BLOB.into();
            c.oat.max_hosts = 1000;
            c.ek_ca = vec![c.tls.client_ca.clone()];
            c.audit_file = None;
        }))
        .unwrap();
    let hosts: Vec<String> = (0..1000).map(|i| format!("compute-{i:04}")).collect();
    server_rt.block_on(async {
        let now = Utc::now();
        for (i, h) in hosts.iter().enumerate() {
            let trust = if i % 10 == 0 {
                Trust::Untrusted
            } else {
                Trust::Trusted
            };
            pool.store_verdict(h, trust, now, now + Duration::hours(2))
                .await
                .unwrap();
        }
    });

    let mtls = pool.http("scheduler").unwrap();
    let ca = pool.path("ca.pem");
    let nova = {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .unwrap()
    };
    let query_url = format!("{}/v1/trust/query", pool.url);
    let poll_url =
        format!("https://127.0.0.1:{oat_port}/OpenAttestationWebServices/V1.0/PollHosts");

    println!("| request | hosts | p50 ms | p99 ms | requests/s |");
    println!("|---|---|---|---|---|");
    client_rt.block_on(async {
        for (n, iterations) in [(1usize, 3000usize), (100, 1500), (1000, 400)] {
            let body = serde_json::json!({ "hosts": &hosts[..n] }).to_string();
            measure("POST /v1/trust/query (mTLS)", n, iterations, async || {
                let r = mtls
                    .post(&query_url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let _ = r.bytes().await.unwrap();
                status
            })
            .await;
            let body = serde_json::json!({ "count": n, "hosts": &hosts[..n] }).to_string();
            measure(
                "POST PollHosts (TLS, auth blob)",
                n,
                iterations,
                async || {
                    let r = nova
                        .post(&poll_url)
                        .header("content-type", "application/json")
                        .header("x-auth-blob", BLOB)
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let _ = r.bytes().await.unwrap();
                    status
                },
            )
            .await;
        }
    });
    server_rt.block_on(pool.stop());
}
