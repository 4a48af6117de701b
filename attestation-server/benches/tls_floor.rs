//! The floor under `bench/load.sh`: the same exchanges as an attestation
//! of `attestctl simulate` (a mutual-TLS connection, resumed when the
//! virtual host has a ticket; `POST .../challenge`; a real ECDSA quote
//! built and sent as `POST .../evidence`; close) against a server with the
//! attestation server's own TLS configuration (`tls::server_config`: TLS
//! 1.3, client certificates, stateless tickets) and connection handling
//! (`serve_connection`: handshake, client identity, hyper HTTP/1.1), whose handlers answer canned JSON: no
//! verification, no storage, no audit event. Server and simulator each get
//! their own two-thread runtime, as the two processes of `bench/load.sh`
//! do, on the same cores.
//!
//! What it says: how many attestations per second this machine could carry
//! if verifying, storing and auditing one cost nothing. It prints one JSON
//! line: exchanges/s over the window, the share of resumed handshakes, and
//! the CPU time per exchange of each side.
//!
//!   cargo bench -p attestation-server --bench tls_floor
//!   FLOOR_HOSTS=2000 FLOOR_SECS=20 FLOOR_CONCURRENCY=64 cargo bench ...

use anyhow::{anyhow, Context, Result};
use attestation_server::config::{ServerTls, TlsSuite};
use attestation_server::pki::Ca;
use attestation_server::simulate::http::{Conn, Target};
use attestation_server::simulate::{self, fleet, quote};
use axum::routing::post;
use proto::wire::{selection_from_map, Challenge, PcrSelectionMap};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v:?}")),
        Err(_) => Ok(default),
    }
}

/// A virtual host: its TLS client configuration (certificate, one-ticket
/// resumption store) and its attestation key.
struct Host {
    name: String,
    tls: Arc<rustls::ClientConfig>,
    ak: ring::signature::EcdsaKeyPair,
    ak_name: Vec<u8>,
}

fn host(ca: &Ca, roots: &Arc<rustls::RootCertStore>, i: usize) -> Result<Host> {
    let name = format!("floor-{i:06}");
    let issued = ca.issue_client("agent", &name)?;
    let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?;
    let tls = simulate::host_tls(roots, cert, key, true)?;
    let (ak_public, ak) = fleet::ak(&fleet::derive_key(b"tls floor", "ak", i))?;
    Ok(Host {
        name,
        tls,
        ak,
        ak_name: ak_public.name(),
    })
}

/// The server: the attestation server's TLS and HTTP/1.1 stack, canned
/// answers of the real ones' sizes.
async fn serve(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>) {
    let selection: PcrSelectionMap = [(proto::tpm::HashAlg::Sha256, (0..=10).collect())].into();
    let challenge = Challenge {
        nonce: hex::encode([0x5a; attestation_server::challenge::NONCE_LEN]),
        pcr_selection: selection,
        expires_at: chrono::Utc::now() + chrono::Duration::days(1),
        uefi_log: false,
        ima_from: None,
    };
    let challenge = serde_json::to_string(&challenge).unwrap_or_default();
    let verdict = serde_json::json!({
        "host": "floor-000000", "trust": "trusted", "reasons": [],
        "verified_at": "2026-12-03T20:00:00.000000Z", "expires_at": "2026-12-03T20:10:00.000000Z",
        "policy": {"whitelist": "fleet", "version": 1, "group": null},
        "event_id": "0193c9e5-0000-7000-8000-000000000000"
    })
    .to_string();
    let app = axum::Router::new()
        .route(
            "/v1/agents/{host}/challenge",
            post(move |_: axum::body::Bytes| async move { challenge }),
        )
        .route(
            "/v1/agents/{host}/evidence",
            post(move |body: axum::body::Bytes| async move {
                // Read as the real handler would, to pay for the parse.
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(_) => verdict,
                    Err(_) => String::new(),
                }
            }),
        );
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Never told to stop: the process ends with the window.
    let (_keep, stop) = tokio::sync::watch::channel(false);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors and the like: pause rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(attestation_server::serve_connection(
            tcp,
            acceptor.clone(),
            app.clone(),
            stop.clone(),
        ));
    }
}

/// One attestation's exchanges; whether the handshake was resumed.
async fn exchange(target: &Target, h: &Host) -> Result<bool> {
    let mut conn = Conn::connect(target, h.tls.clone()).await?;
    let resumed = conn.resumed;
    let path = format!("/v1/agents/{}", h.name);
    let resp = conn
        .send("POST", &format!("{path}/challenge"), b"{}")
        .await?;
    let challenge: Challenge = serde_json::from_slice(&resp.body)?;
    let selection = selection_from_map(&challenge.pcr_selection);
    let evidence = quote::quote(&h.ak, &h.ak_name, &challenge.nonce, &selection, false)?;
    let body = serde_json::to_vec(&evidence)?;
    let resp = conn
        .send("POST", &format!("{path}/evidence"), &body)
        .await?;
    let verdict: serde_json::Value = serde_json::from_slice(&resp.body)?;
    if verdict["trust"] != "trusted" {
        return Err(anyhow!("unexpected answer: {}", resp.status));
    }
    conn.close().await;
    Ok(resumed)
}

/// CPU seconds of this process's threads whose name starts with `prefix`.
fn cpu_secs(prefix: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut total = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: utime and stime are the
        // 12th and 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            total += f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total as f64 / ticks
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; without it (`cargo test
    // --all-targets`) a one-second run of 20 hosts checks that it works.
    let full = std::env::args().any(|a| a == "--bench");
    let hosts = env_or("FLOOR_HOSTS", if full { 2000 } else { 20 })? as usize;
    let secs = env_or("FLOOR_SECS", if full { 20 } else { 1 })?;
    let concurrency = env_or("FLOOR_CONCURRENCY", 64)? as usize;

    let dir = tempfile::tempdir()?;
    let (ca, ca_pem) = Ca::new("tls floor CA")?;
    ca.issue_server("localhost")?.write(dir.path(), "server")?;
    std::fs::write(dir.path().join("ca.pem"), &ca_pem)?;
    let server_tls = attestation_server::tls::server_config(&ServerTls {
        cert: dir.path().join("server.pem"),
        key: dir.path().join("server.key"),
        client_ca: dir.path().join("ca.pem"),
        cipher_suites: TlsSuite::DEFAULT_ORDER.to_vec(),
    })?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let roots = Arc::new(roots);
    let fleet: Vec<Host> = (0..hosts)
        .map(|i| host(&ca, &roots, i))
        .collect::<Result<_>>()?;
    let fleet = Arc::new(fleet);

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("floor-server")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("floor-client")
        .enable_all()
        .build()?;
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    server_rt.spawn(serve(listener, Arc::new(server_tls)));
    let target = Arc::new(Target::parse(&format!("https://localhost:{port}"))?);

    client_rt.block_on(async move {
        // Warm-up: every host once, so that it holds a ticket, as a fleet
        // that has been running does.
        run(&target, &fleet, concurrency, None).await?;
        let (done, resumed, errors) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let counters = (done.clone(), resumed.clone(), errors.clone());
        let (s0, c0, t0) = (
            cpu_secs("floor-server"),
            cpu_secs("floor-client"),
            Instant::now(),
        );
        run(
            &target,
            &fleet,
            concurrency,
            Some((Duration::from_secs(secs), counters)),
        )
        .await?;
        let wall = t0.elapsed().as_secs_f64();
        let (s1, c1) = (cpu_secs("floor-server"), cpu_secs("floor-client"));
        let errors = errors.load(Ordering::Relaxed);
        if errors > 0 && !full {
            return Err(anyhow!("{errors} exchanges failed"));
        }
        let n = done.load(Ordering::Relaxed).max(1) as f64;
        println!(
            "{}",
            serde_json::json!({
                "hosts": hosts,
                "concurrency": concurrency,
                "window_s": wall,
                "exchanges": n,
                "exchanges_per_second": n / wall,
                "resumed_share": resumed.load(Ordering::Relaxed) as f64 / n,
                "errors": errors,
                "server_cpu_us_per_exchange": (s1 - s0) * 1e6 / n,
                "simulator_cpu_us_per_exchange": (c1 - c0) * 1e6 / n,
            })
        );
        anyhow::Ok(())
    })?;
    Ok(())
}

type Counters = (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>);

/// `concurrency` workers taking hosts in turn: each host once (no window),
/// or round and round until the window ends, counting.
async fn run(
    target: &Arc<Target>,
    fleet: &Arc<Vec<Host>>,
    concurrency: usize,
    window: Option<(Duration, Counters)>,
) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let end = window.as_ref().map(|(d, _)| Instant::now() + *d);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (target, fleet, next, stop) =
            (target.clone(), fleet.clone(), next.clone(), stop.clone());
        let counters = window.as_ref().map(|(_, c)| c.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if stop.load(Ordering::Relaxed) || (end.is_none() && i >= fleet.len()) {
                    return anyhow::Ok(());
                }
                if end.is_some_and(|e| Instant::now() >= e) {
                    stop.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                let Some(h) = fleet.get(i % fleet.len()) else {
                    return Ok(());
                };
                let outcome = exchange(&target, h).await;
                match (&counters, outcome) {
                    (Some((done, resumed, _)), Ok(r)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        resumed.fetch_add(u64::from(r), Ordering::Relaxed);
                    }
                    (Some((_, _, errors)), Err(_)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    (None, Err(e)) => return Err(e.context(format!("warm-up of {}", h.name))),
                    (None, Ok(_)) => {}
                }
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r??;
    }
    Ok(())
}
