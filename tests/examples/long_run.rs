//! Long run (issue 9): the host agent's own attestation round, every
//! `--interval-ms` against a real swtpm and an in-process server, for
//! `--quotes` quotes. Every `--sample` quotes it prints one JSON line: the
//! process's RSS, and the TPM's transient objects and sessions as
//! `tpm2_getcap` sees them between rounds (the agent releases the TPM
//! between attestations, so the tool can connect). Flat RSS and zero
//! handles and sessions throughout mean no leak. `threads` is the process's
//! thread count: glibc gives threads their own malloc arenas, so RSS that
//! steps up with it is arenas, not a leak. A benchmark-style script,
//! not a CI test:
//!
//!   cargo run --release -p e2e-tests --example long_run -- --quotes 100000 --interval-ms 100

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a measurement harness

use e2e_tests::Pool;
use proto::wire::Trust;
use std::time::{Duration, Instant};
use test_support::SwTpm;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A number field of /proc/self/status (`VmRSS` in kB, `Threads`).
fn status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kb() -> u64 {
    status("VmRSS")
}

/// Threads whose name starts with `prefix`: sqlx runs each open SQLite
/// connection on its own `sqlx-sqlite-worker` thread, and each connection
/// has its own page cache (2 MB at SQLite's default), so this counts the
/// server's open database connections.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|name| name.starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

/// How many handles of a kind the TPM holds (`tpm2_getcap` prints one per line).
fn handles(tpm: &SwTpm, kind: &str) -> usize {
    let out = tpm.run_tool("tpm2_getcap", [kind]).expect("tpm2_getcap");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("- 0x") || l.trim_start().starts_with("0x"))
        .count()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let quotes = arg("--quotes", 1000);
    let interval = Duration::from_millis(arg("--interval-ms", 100));
    let sample = arg("--sample", 500).max(1);
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
        c.freshness_secs = 3600;
    })
    .await?;
    let config = pool.agent_config("node1")?;
    let mut agent = host_agent::Agent::new(&config)?;
    agent.enroll().await?;
    agent.attest_once().await?;
    let admin = pool.client("admin")?;
    let _: serde_json::Value = admin
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;

    let started = Instant::now();
    let mut untrusted = 0u64;
    let mut errors = 0u64;
    let first_rss = rss_kb();
    let mut max_rss = first_rss;
    let mut max_transient = 0;
    let mut max_sessions = 0;
    for n in 1..=quotes {
        let round = Instant::now();
        match agent.attest_once().await {
            Ok(v) if v.trust == Trust::Trusted => {}
            Ok(_) => untrusted += 1,
            Err(e) => {
                errors += 1;
                eprintln!("quote {n}: {e}");
            }
        }
        if n % sample == 0 || n == quotes {
            let rss = rss_kb();
            let transient = handles(&tpm, "handles-transient");
            let sessions =
                handles(&tpm, "handles-loaded-session") + handles(&tpm, "handles-saved-session");
            max_rss = max_rss.max(rss);
            max_transient = max_transient.max(transient);
            max_sessions = max_sessions.max(sessions);
            println!(
                "{}",
                serde_json::json!({"quotes": n, "secs": started.elapsed().as_secs_f64().round(),
                    "rss_kb": rss, "rss_anon_kb": status("RssAnon"), "rss_file_kb": status("RssFile"),
                    "rss_shmem_kb": status("RssShmem"), "threads": status("Threads"),
                    "sqlite_connections": threads_named("sqlx-sqlite"),
                    "tpm_transient": transient, "tpm_sessions": sessions, "untrusted": untrusted, "errors": errors})
            );
        }
        if let Some(rest) = interval.checked_sub(round.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    println!(
        "{}",
        serde_json::json!({"summary": true, "quotes": quotes, "interval_ms": interval.as_millis(),
            "secs": started.elapsed().as_secs_f64(), "rss_first_kb": first_rss, "rss_max_kb": max_rss,
            "tpm_transient_max": max_transient, "tpm_sessions_max": max_sessions,
            "untrusted": untrusted, "errors": errors})
    );
    agent.shutdown().await;
    pool.stop().await;
    Ok(())
}
