//! The fleet simulator (`attestctl simulate`) against an in-process server:
//! virtual hosts enroll through the real protocol (EK certificate from the
//! simulator's EK CA, credential activation), then attest on schedule;
//! honest hosts end trusted, tampered ones untrusted on PCR 7, garbage
//! refused, and the summary's counts add up.

use attestation_server::simulate::{self, SimulateArgs};
use e2e_tests::Pool;
use proto::wire::Trust;

fn args(pool: &Pool, hosts: usize, duration: f64) -> SimulateArgs {
    SimulateArgs {
        dir: pool.dir.path().to_path_buf(),
        hosts,
        interval: 1.0,
        duration,
        ramp: Some(0.5),
        warmup: 0.0,
        tampered: 0.2,
        garbage: 0.1,
        garbage_interval: None,
        concurrency: 8,
        enroll_only: false,
        prepare_only: false,
        no_resumption: false,
        server_url: Some(pool.url.clone()),
        prefix: "sim".into(),
    }
}

/// A pool whose server trusts the simulator's EK CA (made in the pool directory).
async fn sim_pool() -> anyhow::Result<Pool> {
    Pool::start(&[], 5, |c| {
        let dir = c.tls.cert.parent().expect("pool dir").to_path_buf();
        let ek_ca = simulate::fleet::ensure_ek_ca(&dir).expect("EK CA");
        c.ek_ca = vec![ek_ca];
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_fleet_enrolls_and_attests_with_expected_verdicts() -> anyhow::Result<()> {
    let pool = sim_pool().await?;
    let hosts = 20;
    let s = simulate::run(&args(&pool, hosts, 3.5)).await?;
    eprintln!("{}", serde_json::to_string_pretty(&s)?);

    // Every host enrolled once (EK certificate checked, credential
    // activated) and got its whitelist.
    assert_eq!(s.enrollments, hosts as u64);
    assert_eq!(s.whitelists_set, hosts as u64);
    let honest = &s.by_kind["honest"];
    let tampered = &s.by_kind["tampered"];
    let garbage = &s.by_kind["garbage"];
    let count = |k| {
        (0..hosts)
            .filter(|i| simulate::kind_of(*i, 0.2, 0.1) == k)
            .count()
    };
    assert_eq!((honest.hosts, tampered.hosts, garbage.hosts), (14, 4, 2));
    assert_eq!(count(simulate::Kind::Tampered), 4);
    // Several rounds of attestation, every verdict the expected one.
    assert!(honest.trusted >= 2 * 14, "{honest:?}");
    assert_eq!(
        (honest.untrusted, honest.errors, honest.unexpected),
        (0, 0, 0)
    );
    assert!(tampered.untrusted >= 2 * 4, "{tampered:?}");
    assert_eq!(
        (tampered.trusted, tampered.errors, tampered.unexpected),
        (0, 0, 0)
    );
    assert!(garbage.errors >= 2 * 2, "{garbage:?}");
    assert_eq!(garbage.trusted, 0);
    // Counts add up: every attempt is a verdict or an error.
    for k in s.by_kind.values() {
        assert_eq!(k.attempts, k.trusted + k.untrusted + k.errors);
    }
    let errors: u64 = s.errors.values().sum();
    assert_eq!(errors, garbage.errors, "{:?}", s.errors);
    assert_eq!(s.attestations, s.trusted + s.untrusted);
    assert!(s.attestations <= honest.trusted + tampered.untrusted);
    assert!(s.attestations_per_second > 0.0);
    assert!(s.p50_ms > 0.0 && s.p50_ms <= s.p99_ms);
    assert_eq!(
        s.tls_full + s.tls_resumed,
        s.by_kind.values().map(|k| k.attempts).sum::<u64>()
    );

    // The server agrees, host by host.
    for i in 0..hosts {
        let name = simulate::host_name("sim", i);
        let t = pool.trust(&name).await?;
        match simulate::kind_of(i, 0.2, 0.1) {
            simulate::Kind::Honest => assert_eq!(t.trust, Trust::Trusted, "{t:?}"),
            simulate::Kind::Tampered => {
                assert_eq!(t.trust, Trust::Untrusted, "{t:?}");
                let fault = t.reasons[0].pcr.as_ref().expect("PCR fault");
                assert_eq!(
                    (t.reasons[0].code.as_str(), fault.index),
                    ("pcr_not_whitelisted", 7)
                );
            }
            simulate::Kind::Garbage => {
                assert_eq!(t.trust, Trust::Untrusted, "{t:?}");
                assert_eq!(t.reasons[0].step, "decode", "{t:?}");
            }
        }
    }

    // A second run reuses the enrolled fleet (DIR/sim/fleet.json): no new
    // enrollment, and the TPM clock keeps going forward across runs.
    let again = simulate::run(&args(&pool, hosts, 1.5)).await?;
    assert_eq!(again.enrollments, 0);
    assert_eq!(again.by_kind["honest"].unexpected, 0);
    assert!(again.by_kind["honest"].trusted >= 14);
    assert!(
        !again.errors.contains_key("clock_replay"),
        "{:?}",
        again.errors
    );
    pool.stop().await;
    Ok(())
}

/// A warm-up leaves each host's first connection of a run (a full TLS
/// handshake: a new simulator holds no session tickets) out of the
/// summary, so the window shows a fleet that has been running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_leaves_each_hosts_first_handshake_out_of_the_summary() -> anyhow::Result<()> {
    let pool = sim_pool().await?;
    let honest = |warmup, duration| SimulateArgs {
        tampered: 0.0,
        garbage: 0.0,
        warmup,
        ..args(&pool, 6, duration)
    };
    let enrolled = simulate::run(&SimulateArgs {
        enroll_only: true,
        ..honest(0.0, 1.0)
    })
    .await?;
    assert_eq!(enrolled.enrollments, 6, "{:?}", enrolled.errors);

    // Without a warm-up the run starts with every host's full handshake.
    let cold = simulate::run(&honest(0.0, 2.0)).await?;
    assert_eq!(cold.warmup_secs, 0.0);
    assert!(cold.tls_full >= 6, "{cold:?}");

    // Every host attests twice within the warm-up (ramp 0.5 s, interval
    // 1 s); the window then holds only resumed handshakes.
    let warm = simulate::run(&honest(2.0, 2.0)).await?;
    assert_eq!(warm.warmup_secs, 2.0);
    assert_eq!(warm.tls_full, 0, "{warm:?}");
    assert!(warm.tls_resumed >= 6, "{warm:?}");
    assert!(warm.attestations >= 6, "{warm:?}");
    assert_eq!(warm.by_kind["honest"].errors, 0, "{:?}", warm.errors);
    assert!((warm.duration_secs - 2.0).abs() < 1e-9, "{warm:?}");
    pool.stop().await;
    Ok(())
}

/// Rotating the pool's challenge key (`attestctl challenge-key rotate`)
/// while the fleet attests refuses no honest host: nonces issued just
/// before stay valid under the previous key, and the server loads the new
/// key from the database by itself (no restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_challenge_key_under_load_refuses_no_honest_host() -> anyhow::Result<()> {
    use attestation_server::ctl::challenge_key::{run, ChallengeKeyCommand};
    let pool = sim_pool().await?;
    let honest_only = |duration| SimulateArgs {
        tampered: 0.0,
        garbage: 0.0,
        ..args(&pool, 6, duration)
    };
    let before = pool.state.challenge_keys.get().generation;
    let first = simulate::run(&honest_only(1.0)).await?;
    assert_eq!(first.by_kind["honest"].errors, 0, "{:?}", first.errors);

    let rotate = ChallengeKeyCommand::Rotate {
        server_config: pool.path("server.toml"),
    };
    let during_args = honest_only(3.0);
    let fleet = simulate::run(&during_args);
    let rotation = async {
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        run(&rotate).await
    };
    let (during, rotated) = tokio::join!(fleet, rotation);
    let (during, rotated) = (during?, rotated?);
    assert_eq!(rotated["generation"], serde_json::json!(before + 1));
    let honest = &during.by_kind["honest"];
    assert_eq!(
        (honest.errors, honest.untrusted, honest.unexpected),
        (0, 0, 0),
        "{:?}",
        during.errors
    );
    assert!(honest.trusted >= 2 * 6, "{honest:?}");
    // The server noticed the rotation through the host records it read.
    assert_eq!(pool.state.challenge_keys.get().generation, before + 1);
    // And the rotation is in the audit trail.
    let events = pool.audit_events().await?;
    assert!(
        events
            .iter()
            .any(|e| e["reason"]["reasonCode"] == "challenge_key_rotated"),
        "no rotation event"
    );
    pool.stop().await;
    Ok(())
}
