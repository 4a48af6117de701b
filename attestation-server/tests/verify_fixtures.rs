//! Verifier tests on recorded quotes (fixtures/, no TPM needed): every
//! fixture verifies, and each step fails on the input it exists to catch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::verify::{
    self, ClockFailure, DecodeFailure, DigestFailure, Expected, Failure, IssuedChallenge,
    NonceFailure, Policy, SelectionFailure, SignatureFailure,
};
use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use proto::tpm::{Attest, Public};
use proto::wire::{Evidence, PcrValues, Trust, Whitelist};
use std::path::PathBuf;

struct Fixture {
    ak: Public,
    evidence: Evidence,
    attest: Attest,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn load(dir: &str, msg: &str, sig: &str) -> Fixture {
    let d = root().join(dir);
    let read = |f: &str| std::fs::read(d.join(f)).unwrap_or_else(|e| panic!("{dir}/{f}: {e}"));
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
    let attest_bytes = read(msg);
    let pcrs: PcrValues = serde_json::from_slice(&read("pcrs.json")).unwrap();
    Fixture {
        ak: Public::decode(&read("ak.pub")).unwrap(),
        attest: Attest::decode(&attest_bytes).unwrap(),
        evidence: Evidence {
            nonce: String::from_utf8(read("nonce.hex"))
                .unwrap()
                .trim()
                .to_string(),
            attest: b64(attest_bytes),
            signature: b64(read(sig)),
            pcrs,
            uefi_log: None,
            ima: None,
        },
    }
}

fn ours(kind: &str) -> Fixture {
    load(&format!("quotes/{kind}"), "quote.msg", "quote.sig")
}

const KINDS: [&str; 3] = ["rsa", "rsapss", "ecc"];

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn challenge_for(f: &Fixture) -> IssuedChallenge {
    IssuedChallenge {
        selection: Some(f.attest.quote.pcr_select.clone()),
        expires_at: now() + Duration::seconds(30),
    }
}

/// A whitelist that accepts exactly the fixture's values.
fn golden(pcrs: &PcrValues) -> Whitelist {
    Whitelist {
        pcrs: pcrs
            .iter()
            .map(|(b, v)| (*b, v.iter().map(|(i, h)| (*i, vec![h.clone()])).collect()))
            .collect(),
    }
}

fn run(
    f: &Fixture,
    ev: &Evidence,
    ch: Option<&IssuedChallenge>,
    wl: Option<&Whitelist>,
) -> Result<verify::Verified, Failure> {
    let expected = Expected {
        host: "node1",
        ak: &f.ak,
        challenge: ch,
        last_clock: None,
    };
    let host_policy = wl
        .map(|w| verify::HostPolicy::own("node1", w))
        .unwrap_or_default();
    let policy = Policy {
        host_policy: &host_policy,
        freshness: Duration::seconds(60),
    };
    verify::verify(ev, &expected, &policy, now())
}

#[test]
fn every_recorded_quote_verifies_and_is_trusted_against_its_own_values() {
    let mut all: Vec<(String, Fixture)> = KINDS.iter().map(|k| (k.to_string(), ours(k))).collect();
    all.push((
        "keylime".into(),
        load("keylime", "quote.out", "quotesig.out"),
    ));
    for (name, f) in &all {
        let ch = challenge_for(f);
        let wl = golden(&f.evidence.pcrs);
        let v = run(f, &f.evidence, Some(&ch), Some(&wl)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.verdict.trust, Trust::Trusted, "{name}");
        assert!(v.verdict.reasons.is_empty(), "{name}");
        assert_eq!(v.verdict.expires_at, Some(now() + Duration::seconds(60)));
    }
}

#[test]
fn decode_step_refuses_garbage() {
    for kind in KINDS {
        let f = ours(kind);
        let ch = challenge_for(&f);
        let mut ev = f.evidence.clone();
        ev.attest = "not base64!".into();
        assert!(matches!(
            run(&f, &ev, Some(&ch), None),
            Err(Failure::Decode(DecodeFailure::Encoding {
                field: "attest",
                ..
            }))
        ));
        let mut ev = f.evidence.clone();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&ev.attest)
            .unwrap();
        ev.attest = base64::engine::general_purpose::STANDARD.encode(&raw[..raw.len() - 5]);
        let err = run(&f, &ev, Some(&ch), None).unwrap_err();
        assert!(
            matches!(err, Failure::Decode(DecodeFailure::Attest(_))),
            "{kind}: {err}"
        );
        assert_eq!(err.code(), "attest_malformed");
        let mut ev = f.evidence.clone();
        ev.signature = base64::engine::general_purpose::STANDARD.encode([0u8, 0x14, 0, 0x0b, 1]);
        assert!(matches!(
            run(&f, &ev, Some(&ch), None),
            Err(Failure::Decode(DecodeFailure::Signature(_)))
        ));
        let mut ev = f.evidence.clone();
        ev.pcrs.values_mut().next().unwrap().insert(3, "00".into());
        assert!(matches!(
            run(&f, &ev, Some(&ch), None),
            Err(Failure::Decode(DecodeFailure::PcrLength { index: 3, .. }))
        ));
    }
}

#[test]
fn signature_step_refuses_altered_quotes_and_foreign_keys() {
    for kind in KINDS {
        let f = ours(kind);
        let ch = challenge_for(&f);
        // Flip one bit of the signature.
        let mut sig = base64::engine::general_purpose::STANDARD
            .decode(&f.evidence.signature)
            .unwrap();
        let last = sig.len() - 1;
        sig[last] ^= 1;
        let mut ev = f.evidence.clone();
        ev.signature = base64::engine::general_purpose::STANDARD.encode(&sig);
        let err = run(&f, &ev, Some(&ch), None).unwrap_err();
        assert_eq!(err, Failure::Signature(SignatureFailure::Invalid), "{kind}");
        // Alter the signed message (its firmwareVersion) and keep the signature.
        let mut attest = f.attest.clone();
        attest.firmware_version ^= 1;
        let mut ev = f.evidence.clone();
        ev.attest = base64::engine::general_purpose::STANDARD.encode(attest.encode());
        assert_eq!(
            run(&f, &ev, Some(&ch), None).unwrap_err(),
            Failure::Signature(SignatureFailure::Invalid),
            "{kind}"
        );
    }
    // A quote from one TPM checked against the AK of another TPM.
    let rsa = ours("rsa");
    for other in ["ecc", "rsapss"] {
        let foreign = Fixture {
            ak: ours(other).ak,
            ..ours("rsa")
        };
        let err = run(&foreign, &rsa.evidence, Some(&challenge_for(&rsa)), None).unwrap_err();
        assert!(
            matches!(
                err,
                Failure::Signature(SignatureFailure::SchemeMismatch { .. })
            ),
            "{other}: {err}"
        );
    }
    // Same scheme, another TPM's key: the signature itself fails.
    let mut other_tpm = ours("rsapss").ak;
    other_tpm.scheme = proto::tpm::KeyScheme::RsaSsa(proto::HashAlg::Sha256);
    let foreign = Fixture {
        ak: other_tpm,
        ..ours("rsa")
    };
    let err = run(&foreign, &rsa.evidence, Some(&challenge_for(&rsa)), None).unwrap_err();
    assert_eq!(err, Failure::Signature(SignatureFailure::Invalid));
}

#[test]
fn nonce_step_checks_quoting_origin_and_expiry() {
    for kind in KINDS {
        let f = ours(kind);
        let ch = challenge_for(&f);
        let mut ev = f.evidence.clone();
        ev.nonce = "00".repeat(32);
        assert_eq!(
            run(&f, &ev, Some(&ch), None).unwrap_err(),
            Failure::Nonce(NonceFailure::NotQuoted)
        );
        assert_eq!(
            run(&f, &f.evidence, None, None).unwrap_err(),
            Failure::Nonce(NonceFailure::Unknown)
        );
        let expired = IssuedChallenge {
            expires_at: now(),
            ..ch.clone()
        };
        let err = run(&f, &f.evidence, Some(&expired), None).unwrap_err();
        assert!(matches!(err, Failure::Nonce(NonceFailure::Expired { .. })));
        assert_eq!(err.code(), "nonce_expired");
    }
}

#[test]
fn selection_step_wants_exactly_the_requested_pcrs() {
    for kind in KINDS {
        let f = ours(kind);
        let mut ch = challenge_for(&f);
        if let Some(asked) = ch.selection.as_mut() {
            asked.banks[0].1.remove(&10);
        }
        let err = run(&f, &f.evidence, Some(&ch), None).unwrap_err();
        assert!(
            matches!(
                err,
                Failure::PcrSelection(SelectionFailure::QuoteDiffers { .. })
            ),
            "{err}"
        );
        // A challenge from before a policy change asks for no particular
        // PCRs: what the quote covers is judged.
        let mut ch = challenge_for(&f);
        ch.selection = None;
        assert!(run(&f, &f.evidence, Some(&ch), None).is_ok());
        let ch = challenge_for(&f);
        let mut ev = f.evidence.clone();
        ev.pcrs.values_mut().next().unwrap().remove(&10);
        let err = run(&f, &ev, Some(&ch), None).unwrap_err();
        assert!(
            matches!(
                err,
                Failure::PcrSelection(SelectionFailure::ValuesDiffer { .. })
            ),
            "{err}"
        );
    }
}

#[test]
fn digest_step_catches_doctored_pcr_values() {
    for kind in KINDS {
        let f = ours(kind);
        let ch = challenge_for(&f);
        // Make PCR 7 look like a value a whitelist might want.
        let mut ev = f.evidence.clone();
        ev.pcrs
            .values_mut()
            .next()
            .unwrap()
            .insert(7, "00".repeat(32));
        let wl = golden(&ev.pcrs);
        let err = run(&f, &ev, Some(&ch), Some(&wl)).unwrap_err();
        assert!(
            matches!(err, Failure::PcrDigest(DigestFailure::Mismatch { .. })),
            "{err}"
        );
        assert_eq!(err.reason().step, "pcr_digest");
    }
}

#[test]
fn whitelist_step_names_the_failing_pcr_and_accepts_any_listed_value() {
    for kind in KINDS {
        let f = ours(kind);
        let ch = challenge_for(&f);
        let bank = *f.evidence.pcrs.keys().next().unwrap();
        let actual7 = f.evidence.pcrs[&bank][&7].clone();
        let mut wl = golden(&f.evidence.pcrs);
        let other = "ab".repeat(32);
        wl.pcrs
            .get_mut(&bank)
            .unwrap()
            .insert(7, vec![other.clone()]);
        let v = run(&f, &f.evidence, Some(&ch), Some(&wl)).unwrap();
        assert_eq!(v.verdict.trust, Trust::Untrusted);
        assert_eq!(v.verdict.reasons.len(), 1);
        let fault = v.verdict.reasons[0].pcr.clone().unwrap();
        assert_eq!((fault.index, fault.bank), (7, bank));
        assert_eq!(fault.expected, vec![other.clone()]);
        assert_eq!(fault.actual, Some(actual7.clone()));
        // Rolling upgrade: old and new value both acceptable.
        wl.pcrs
            .get_mut(&bank)
            .unwrap()
            .insert(7, vec![other, actual7.to_uppercase()]);
        assert_eq!(
            run(&f, &f.evidence, Some(&ch), Some(&wl))
                .unwrap()
                .verdict
                .trust,
            Trust::Trusted
        );
        // No whitelist, or an empty one, is never trusted.
        for none in [None, Some(&Whitelist::default())] {
            let v = run(&f, &f.evidence, Some(&ch), none).unwrap();
            assert_eq!(v.verdict.trust, Trust::Untrusted);
            assert_eq!(v.verdict.reasons[0].code, "no_whitelist");
        }
    }
}

#[test]
fn whitelist_validation_refuses_bad_shapes() {
    use proto::policy::{normalize_parts, Part, Parts};
    let f = ours("rsa");
    let parts = |wl: &Whitelist| {
        Parts::from([(
            "host_unique".to_string(),
            Part {
                pcrs: wl.pcrs.clone(),
                ..Part::default()
            },
        )])
    };
    let mut wl = golden(&f.evidence.pcrs);
    assert!(normalize_parts(&mut parts(&wl)).is_ok());
    let bank = *wl.pcrs.keys().next().unwrap();
    wl.pcrs
        .get_mut(&bank)
        .unwrap()
        .insert(24, vec!["00".repeat(32)]);
    let e = normalize_parts(&mut parts(&wl)).unwrap_err();
    assert_eq!(e.code(), "pcr_index_out_of_range");
    assert!(e.to_string().contains("24"));
    let mut wl = golden(&f.evidence.pcrs);
    wl.pcrs
        .get_mut(&bank)
        .unwrap()
        .insert(1, vec!["00".repeat(20)]);
    let e = normalize_parts(&mut parts(&wl)).unwrap_err();
    assert_eq!(e.code(), "digest_malformed");
    assert!(e.to_string().contains("32-byte"));
}

#[test]
fn clock_step_detects_rollback_and_reboots() {
    for kind in KINDS {
        let f = ours(kind);
        let ch = challenge_for(&f);
        let wl = golden(&f.evidence.pcrs);
        let quoted = f.attest.clock_info;
        let check = |last: proto::tpm::ClockInfo| {
            let expected = Expected {
                host: "node1",
                ak: &f.ak,
                challenge: Some(&ch),
                last_clock: Some(last),
            };
            let host_policy = verify::HostPolicy::own("node1", &wl);
            let policy = Policy {
                host_policy: &host_policy,
                freshness: Duration::seconds(60),
            };
            verify::verify(&f.evidence, &expected, &policy, now())
        };
        // Same epoch, earlier clock: fine, no reboot.
        let earlier = proto::tpm::ClockInfo {
            clock: quoted.clock.saturating_sub(1),
            ..quoted
        };
        assert!(!check(earlier).unwrap().rebooted);
        // The last quote was later in the same epoch: the TPM went back.
        let later = proto::tpm::ClockInfo {
            clock: quoted.clock + 1000,
            ..quoted
        };
        let err = check(later).unwrap_err();
        assert!(
            matches!(err, Failure::Clock(ClockFailure::ClockBackwards { .. })),
            "{err}"
        );
        assert_eq!(err.reason().step, "clock");
        // A higher reset count than quoted: counters went back.
        let ahead = proto::tpm::ClockInfo {
            reset_count: quoted.reset_count + 1,
            ..quoted
        };
        assert!(matches!(
            check(ahead),
            Err(Failure::Clock(ClockFailure::ResetCountBackwards { .. }))
        ));
        // The last quote had a lower reset count: a reboot, even with a later clock.
        if quoted.reset_count > 0 {
            let before_reboot = proto::tpm::ClockInfo {
                reset_count: quoted.reset_count - 1,
                clock: quoted.clock + 1_000_000,
                ..quoted
            };
            let v = check(before_reboot).unwrap();
            assert!(v.rebooted);
            assert_eq!(v.verdict.trust, Trust::Trusted);
        }
    }
}
