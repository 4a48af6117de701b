//! Signed attestation results and trust-change push, end to end over real
//! TLS: host tokens verify offline with the published JWKS (and expired,
//! altered or foreign ones do not); subscribers receive a signed
//! notification when a swtpm host is tampered with and when a verdict
//! expires; a subscriber that is down or failing neither slows attestation
//! nor is retried without bound; placement decisions become CADF events.

use anyhow::Context;
use chrono::{Duration, Utc};
use e2e_tests::{free_port, Pool};
use proto::token::{self, Jwks, TokenError, TrustChange};
use proto::wire::Trust;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use test_support::SwTpm;
use tokio::sync::mpsc;

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Delivery {
    /// Header lines, lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
    at: chrono::DateTime<Utc>,
}

impl Delivery {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A local HTTPS webhook receiver answering every request with `status`.
struct Receiver {
    port: u16,
    rx: mpsc::UnboundedReceiver<Delivery>,
    hits: Arc<AtomicUsize>,
}

/// A CA for receivers (configured as the server's `push_ca`) and its file.
struct ReceiverCa {
    _dir: tempfile::TempDir,
    ca: attestation_server::pki::Ca,
    file: PathBuf,
}

fn receiver_ca() -> anyhow::Result<ReceiverCa> {
    let dir = tempfile::tempdir()?;
    let (ca, pem) = attestation_server::pki::Ca::new("webhook receivers CA")?;
    let file = dir.path().join("receivers-ca.pem");
    std::fs::write(&file, pem)?;
    Ok(ReceiverCa {
        _dir: dir,
        ca,
        file,
    })
}

fn start_receiver(ca: &ReceiverCa, status: u16) -> anyhow::Result<Receiver> {
    let issued = ca.ca.issue_server("receiver")?;
    let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?;
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?,
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = mpsc::unbounded_channel();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let (config, tx, counter) = (config.clone(), tx.clone(), counter.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                if let Some(d) = read_request(&mut tls) {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(d);
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = tls.write_all(reply.as_bytes());
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            });
        }
    });
    Ok(Receiver { port, rx, hits })
}

fn read_request(stream: &mut impl Read) -> Option<Delivery> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Delivery {
        headers,
        body: String::from_utf8_lossy(&buf[head_end..]).to_string(),
        at: Utc::now(),
    })
}

/// The next notification about `host` that `pred` accepts, verified with `jwks`.
async fn next_change(
    r: &mut Receiver,
    jwks: &Jwks,
    host: &str,
    within: std::time::Duration,
    pred: impl Fn(&TrustChange) -> bool,
) -> anyhow::Result<(TrustChange, Delivery)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let d = tokio::time::timeout_at(deadline, r.rx.recv())
            .await
            .with_context(|| format!("no matching notification about {host} in {within:?}"))?
            .context("receiver stopped")?;
        let change = token::verify_trust_change(&d.body, jwks)?;
        if change.sub == host && pred(&change) {
            return Ok((change, d));
        }
    }
}

async fn subscribe(
    pool: &Pool,
    url: &str,
    secret: Option<&str>,
) -> Result<Value, proto::client::ClientError> {
    pool.client("admin")
        .map_err(|e| proto::client::ClientError::Tls(e.to_string()))?
        .post("/v1/subscriptions", &json!({"url": url, "secret": secret}))
        .await
}

async fn jwks(pool: &Pool) -> anyhow::Result<Jwks> {
    Ok(pool
        .client("scheduler")?
        .get("/.well-known/jwks.json")
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_subscriptions_expiry_push_and_placements() -> anyhow::Result<()> {
    let ca = receiver_ca()?;
    let push_ca = ca.file.clone();
    let pool = Pool::start(&[("node1", "unused".into())], 30, |c| {
        c.push_ca = Some(push_ca);
        c.token_ttl_secs = 120;
        // No TPM here: any certificate will do as the EK trust anchor.
        c.ek_ca = vec![c.tls.client_ca.clone()];
    })
    .await?;
    let jwks = jwks(&pool).await?;
    assert_eq!(jwks.keys.len(), 1);
    assert_eq!(
        (
            jwks.keys[0].kty.as_str(),
            jwks.keys[0].crv.as_str(),
            jwks.keys[0].alg.as_str()
        ),
        ("EC", "P-256", "ES256")
    );

    // ---- Tokens ----
    let now = Utc::now();
    let expires = now + Duration::seconds(60);
    pool.store_verdict("tok1", Trust::Trusted, now, expires)
        .await?;
    let sched = pool.client("scheduler")?;
    let answer: Value = sched.get("/v1/hosts/tok1/token").await?;
    let jwt = answer["token"].as_str().context("token")?;
    let claims = token::verify_es256(jwt, &jwks, Utc::now().timestamp())?;
    assert_eq!(
        (claims.sub.as_str(), claims.trust.as_str()),
        ("tok1", "trusted")
    );
    assert_eq!(claims.iss, "attestation-server");
    assert_eq!(claims.verified_at, Some(now.timestamp()));
    assert_eq!(claims.expires_at, Some(expires.timestamp()));
    // Capped by the verdict's expiry (60 s), not the 120 s token TTL.
    assert_eq!(claims.exp, expires.timestamp());
    assert!(claims.iat <= Utc::now().timestamp() && claims.iat >= now.timestamp() - 1);
    // Expired, altered and foreign tokens are refused offline.
    assert_eq!(
        token::verify_es256(jwt, &jwks, claims.exp),
        Err(TokenError::Expired {
            exp: claims.exp,
            now: claims.exp
        })
    );
    let parts: Vec<&str> = jwt.split('.').collect();
    let mut forged = claims.clone();
    forged.sub = "evil1".into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        token::b64url(serde_json::to_string(&forged)?.as_bytes()),
        parts[2]
    );
    assert_eq!(
        token::verify_es256(&forged, &jwks, now.timestamp()),
        Err(TokenError::BadSignature)
    );
    let other_key = {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("k.pem");
        std::fs::write(&p, attestation_server::token::generate_key_pem()?)?;
        attestation_server::token::Signer::load(&p)?
    };
    assert!(matches!(
        token::verify_es256(jwt, &other_key.jwks(), now.timestamp()),
        Err(TokenError::UnknownKid { .. })
    ));
    let mut impostor = other_key.jwks();
    impostor.keys[0].kid = jwks.keys[0].kid.clone();
    assert_eq!(
        token::verify_es256(jwt, &impostor, now.timestamp()),
        Err(TokenError::BadSignature)
    );
    // An agent may fetch its own host's token only.
    let agent = pool.client("agent-node1")?;
    let own: Value = agent.get("/v1/hosts/node1/token").await?;
    let own = token::verify_es256(
        own["token"].as_str().context("token")?,
        &jwks,
        now.timestamp(),
    )?;
    assert_eq!((own.trust.as_str(), own.verified_at), ("unknown", None));
    let refused = agent.get::<Value>("/v1/hosts/tok1/token").await;
    assert_eq!(
        refused
            .err()
            .and_then(|e| e.code().map(str::to_string))
            .as_deref(),
        Some("host_mismatch")
    );

    // ---- Subscriptions ----
    let bad = subscribe(&pool, "http://127.0.0.1:1/hook", None).await;
    assert_eq!(
        bad.err()
            .and_then(|e| e.code().map(str::to_string))
            .as_deref(),
        Some("subscription_invalid")
    );
    let denied = pool
        .client("scheduler")?
        .post::<_, Value>("/v1/subscriptions", &json!({"url": "https://127.0.0.1:1/"}))
        .await;
    assert_eq!(
        denied
            .err()
            .and_then(|e| e.code().map(str::to_string))
            .as_deref(),
        Some("forbidden")
    );
    let mut receiver = start_receiver(&ca, 200)?;
    let sub = subscribe(
        &pool,
        &format!("https://127.0.0.1:{}/hook", receiver.port),
        Some("hook-secret"),
    )
    .await?;
    let id = sub["id"].as_str().context("id")?.to_string();
    let listed: Value = pool.client("admin")?.get("/v1/subscriptions").await?;
    assert_eq!(listed["subscriptions"][0]["id"], id.as_str());
    assert_eq!(listed["subscriptions"][0]["has_secret"], true);
    assert!(!listed.to_string().contains("hook-secret"));

    // ---- A verdict passing its expiry is pushed as trusted -> unknown ----
    let lapse_at = Utc::now() + Duration::milliseconds(1500);
    pool.store_verdict("exp1", Trust::Trusted, Utc::now(), lapse_at)
        .await?;
    let (change, delivery) = next_change(
        &mut receiver,
        &jwks,
        "exp1",
        std::time::Duration::from_secs(6),
        |_| true,
    )
    .await?;
    assert_eq!(
        (
            change.event.as_str(),
            change.from.as_str(),
            change.to.as_str()
        ),
        ("trust_changed", "trusted", "unknown")
    );
    assert_eq!(change.iss, "attestation-server");
    assert!(delivery.at >= lapse_at - Duration::milliseconds(10));
    assert!(
        delivery.at - lapse_at < Duration::milliseconds(2000),
        "notified {} after the expiry",
        delivery.at - lapse_at
    );
    assert_eq!(delivery.header("content-type"), Some("application/jwt"));
    assert_eq!(delivery.header("authorization"), Some("Bearer hook-secret"));
    assert!(uuid_like(&change.jti), "{}", change.jti);

    // Unsubscribe; a second delete is a 404.
    let http = pool.http("admin")?;
    let url = format!("{}/v1/subscriptions/{id}", pool.url);
    assert_eq!(http.delete(&url).send().await?.status().as_u16(), 200);
    let again = http.delete(&url).send().await?;
    assert_eq!(again.status().as_u16(), 404);
    assert_eq!(
        again.json::<Value>().await?["error"]["code"],
        "subscription_unknown"
    );
    let listed: Value = pool.client("admin")?.get("/v1/subscriptions").await?;
    assert_eq!(listed["subscriptions"].as_array().map(Vec::len), Some(0));

    // ---- Placement audit ----
    let report = json!({
        "workload": "default/web-1",
        "decisions": [
            {"host": "tok1", "allowed": true, "trust": "trusted", "verified_at": now},
            {"host": "exp1", "allowed": false, "trust": "unknown"}
        ]
    });
    let recorded: Value = sched.post("/v1/placements", &report).await?;
    assert_eq!(recorded["recorded"], 2);
    let not_admin = pool
        .client("admin")?
        .post::<_, Value>("/v1/placements", &report)
        .await;
    assert_eq!(
        not_admin
            .err()
            .and_then(|e| e.code().map(str::to_string))
            .as_deref(),
        Some("forbidden")
    );
    let placements = |events: Vec<String>| -> Vec<Value> {
        events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter(|e| {
                e["tags"]
                    .as_array()
                    .is_some_and(|t| t.contains(&json!("placement")))
            })
            .collect()
    };
    let allow = placements(pool.state.store.host_events("tok1", 100).await?);
    assert_eq!(allow.len(), 1, "{allow:?}");
    assert_eq!(allow[0]["action"], "allow");
    assert_eq!(allow[0]["outcome"], "success");
    assert_eq!(allow[0]["initiator"]["name"], "scheduler");
    assert_eq!(allow[0]["target"]["name"], "tok1");
    assert!(allow[0]["tags"]
        .as_array()
        .is_some_and(|t| t.contains(&json!("workload?value=default/web-1"))));
    let deny = placements(pool.state.store.host_events("exp1", 100).await?);
    assert_eq!(deny.len(), 1);
    assert_eq!(deny[0]["action"], "deny");
    assert!(deny[0]["tags"]
        .as_array()
        .is_some_and(|t| t.contains(&json!("trust?value=unknown"))));

    pool.stop_and_dump_cadf("push-1").await?;
    Ok(())
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tamper_on_swtpm_is_pushed_and_bad_subscribers_do_not_slow_attestation(
) -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let ca = receiver_ca()?;
    let push_ca = ca.file.clone();
    let ek_ca = tpm.local_ca_certs();
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = ek_ca;
        c.push_ca = Some(push_ca);
    })
    .await?;
    let jwks = jwks(&pool).await?;

    // A good receiver, one that always fails (503), and one that never
    // answers (a listener that never accepts: every attempt times out).
    let mut good = start_receiver(&ca, 200)?;
    let mut failing = start_receiver(&ca, 503)?;
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0")?;
    let hole_port = black_hole.local_addr()?.port();
    let down_port = free_port()?;
    for port in [hole_port, failing.port, down_port, good.port] {
        subscribe(&pool, &format!("https://127.0.0.1:{port}/hook"), None).await?;
    }

    let agent = pool.spawn_agent("node1")?;
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    let accepted: proto::wire::HostDetail = pool
        .client("admin")?
        .post("/v1/hosts/node1/whitelist/accept", &json!({}))
        .await?;
    assert_eq!(accepted.verdict.trust, Trust::Trusted);
    let (to_trusted, _) = next_change(
        &mut good,
        &jwks,
        "node1",
        std::time::Duration::from_secs(5),
        |c| c.to == "trusted",
    )
    .await?;
    assert_eq!(to_trusted.from, "untrusted");

    // Tamper: extend PCR 7.
    tpm.pcr_extend(7, "sha256", &"5a".repeat(32))?;
    let untrusted = pool
        .wait_for("node1", "untrusted after the tamper", |t| {
            t.trust == Trust::Untrusted
        })
        .await?;
    let (change, delivery) = next_change(
        &mut good,
        &jwks,
        "node1",
        std::time::Duration::from_secs(5),
        |c| c.to == "untrusted",
    )
    .await?;
    assert_eq!(
        (change.from.as_str(), change.event.as_str()),
        ("trusted", "trust_changed")
    );
    let verified_at = untrusted.verified_at.context("verified_at")?;
    assert_eq!(change.at, verified_at.timestamp());
    assert!(
        delivery.at - verified_at < Duration::milliseconds(1500),
        "delivered {} after the verdict",
        delivery.at - verified_at
    );

    // Attestation keeps its pace (1 s interval) while the black hole makes
    // every delivery to it time out.
    let later = pool
        .wait_for("node1", "two more verdicts", |t| {
            t.verified_at > Some(verified_at + Duration::milliseconds(1500))
        })
        .await?;
    assert!(
        later.verified_at.context("verified_at")? - verified_at < Duration::seconds(5),
        "attestation slowed down: {later:?}"
    );

    // The failing subscriber got each notification a bounded number of
    // times (MAX_ATTEMPTS), then was given up on.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let settled = failing.hits.load(Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        failing.hits.load(Ordering::SeqCst),
        settled,
        "retried without bound"
    );
    let mut attempts: std::collections::BTreeMap<String, usize> = Default::default();
    while let Ok(d) = failing.rx.try_recv() {
        *attempts.entry(d.body).or_default() += 1;
    }
    // unknown -> untrusted, -> trusted, -> untrusted.
    assert!(attempts.len() >= 3, "{attempts:?}");
    let max = attestation_server::push::MAX_ATTEMPTS as usize;
    assert!(attempts.values().all(|n| *n == max), "{attempts:?}");

    agent.stop().await?;
    drop(black_hole);
    pool.stop_and_dump_cadf("push-2").await?;
    Ok(())
}
