//! `scheduler-filter verify-token --jwks FILE TOKEN`: the claims on success,
//! the rejection and exit status 1 otherwise, with no server anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use proto::token::{b64url, sign_es256, Claims, Jwk, Jwks};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::path::Path;
use std::process::Command;

fn key() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

fn claims(exp_in: i64) -> Claims {
    let now = chrono::Utc::now().timestamp();
    Claims {
        iss: "attestation-server".into(),
        sub: "node1".into(),
        trust: "trusted".into(),
        verified_at: Some(now - 5),
        expires_at: Some(now + 120),
        iat: now,
        exp: now + exp_in,
        whitelist_version: None,
    }
}

fn run(jwks: &Path, token: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_scheduler-filter"))
        .args(["verify-token", "--jwks"])
        .arg(jwks)
        .arg(token)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn verify_token_prints_claims_or_the_rejection() {
    let k = key();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let set = Jwks {
        keys: vec![Jwk::from_p256_public(k.public_key().as_ref()).unwrap()],
    };
    std::fs::write(&jwks, serde_json::to_vec(&set).unwrap()).unwrap();

    let expected = claims(60);
    let good = sign_es256(&k, &expected).unwrap();
    let (code, out, err) = run(&jwks, &good);
    assert_eq!(code, 0, "{err}");
    let printed: Claims = serde_json::from_str(&out).unwrap();
    assert_eq!(printed, expected);

    let (code, out, err) = run(&jwks, &sign_es256(&k, &claims(-1)).unwrap());
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.contains("expired"), "{err}");

    let mut lie = claims(60);
    lie.trust = "untrusted".into();
    let parts: Vec<&str> = good.split('.').collect();
    let altered = format!(
        "{}.{}.{}",
        parts[0],
        b64url(serde_json::to_string(&lie).unwrap().as_bytes()),
        parts[2]
    );
    let (code, _, err) = run(&jwks, &altered);
    assert_eq!(code, 1);
    assert!(err.contains("signature"), "{err}");

    let (code, _, err) = run(&jwks, &sign_es256(&key(), &claims(60)).unwrap());
    assert_eq!(code, 1);
    assert!(err.contains("no key with kid"), "{err}");

    let (code, _, err) = run(&dir.path().join("absent.json"), &good);
    assert_eq!(code, 2);
    assert!(err.contains("absent.json"), "{err}");
}
