//! EK certificate validation against real swtpm EK certificates, each TPM
//! with its own private local CA (root -> intermediate -> EK certificate).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::ekcert::{verify_ek_certificate, EkCertError, EkRoots};
use chrono::{DateTime, TimeZone, Utc};
use proto::tpm::Public;
use test_support::SwTpm;

/// A swtpm, its EK certificate and its RSA EK public area.
struct Tpm {
    tpm: SwTpm,
    cert: Vec<u8>,
    ek: Public,
}

impl Tpm {
    fn start() -> Tpm {
        let tpm = SwTpm::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ek_pub = dir.path().join("ek.pub");
        let ek_ctx = dir.path().join("ek.ctx");
        tpm.run_tool(
            "tpm2_createek",
            [
                "-c".as_ref(),
                ek_ctx.as_os_str(),
                "-G".as_ref(),
                "rsa".as_ref(),
                "-u".as_ref(),
                ek_pub.as_os_str(),
            ],
        )
        .unwrap();
        tpm.run_tool("tpm2_flushcontext", ["-t"]).unwrap();
        let ek = Public::decode(&std::fs::read(&ek_pub).unwrap()).unwrap();
        let cert = tpm.ek_cert_der().unwrap();
        Tpm { tpm, cert, ek }
    }

    /// Root and intermediate of this TPM's local CA.
    fn roots(&self) -> EkRoots {
        EkRoots::load(&self.tpm.local_ca_certs()).unwrap()
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

#[test]
fn swtpm_ek_certificate_chain_is_accepted() {
    let t = Tpm::start();
    let roots = t.roots();
    assert_eq!((roots.root_count(), roots.intermediate_count()), (1, 1));
    let info = verify_ek_certificate(&t.cert, &t.ek, &roots, now()).unwrap();
    assert_eq!(info.issuer, "CN=swtpm-localca");
    assert_eq!(info.root, "CN=swtpm-localca-rootca");
    assert!(!info.serial.is_empty());
    assert!(info.not_after > now());

    // The CA's directory works too (its private keys there are skipped).
    let dir = t.tpm.local_ca_certs()[0].parent().unwrap().to_path_buf();
    let from_dir = EkRoots::load(&[dir]).unwrap();
    assert_eq!(
        (from_dir.root_count(), from_dir.intermediate_count()),
        (1, 1)
    );
    assert_eq!(
        verify_ek_certificate(&t.cert, &t.ek, &from_dir, now()).unwrap(),
        info
    );
}

#[test]
fn missing_intermediate_or_root_is_an_unknown_issuer() {
    let t = Tpm::start();
    let [root, intermediate] = <[_; 2]>::try_from(t.tpm.local_ca_certs()).unwrap();

    let only_root = EkRoots::load(&[root]).unwrap();
    match verify_ek_certificate(&t.cert, &t.ek, &only_root, now()) {
        Err(EkCertError::UnknownIssuer { issuer }) => assert_eq!(issuer, "CN=swtpm-localca"),
        other => panic!("{other:?}"),
    }

    // An intermediate alone is no trust anchor.
    let only_intermediate = EkRoots::load(&[intermediate]).unwrap();
    assert_eq!(only_intermediate.root_count(), 0);
    match verify_ek_certificate(&t.cert, &t.ek, &only_intermediate, now()) {
        Err(EkCertError::UnknownIssuer { issuer }) => {
            assert_eq!(issuer, "CN=swtpm-localca-rootca")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn another_tpms_ca_or_ek_is_refused() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(Tpm::start);
        let b = s.spawn(Tpm::start);
        (a.join().unwrap(), b.join().unwrap())
    });
    // Same CA names, different keys: B's CA did not issue A's certificate.
    match verify_ek_certificate(&a.cert, &a.ek, &b.roots(), now()) {
        Err(EkCertError::UnknownIssuer { issuer }) => assert_eq!(issuer, "CN=swtpm-localca"),
        other => panic!("{other:?}"),
    }
    // A valid certificate, but for another TPM's EK.
    assert_ne!(a.ek, b.ek);
    assert!(matches!(
        verify_ek_certificate(&a.cert, &b.ek, &a.roots(), now()),
        Err(EkCertError::KeyMismatch)
    ));
    assert!(verify_ek_certificate(&b.cert, &b.ek, &b.roots(), now()).is_ok());
}

#[test]
fn validity_period_is_enforced() {
    let t = Tpm::start();
    let roots = t.roots();
    // swtpm's local CA issues certificates valid until 9999-12-31.
    let far_future = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap();
    match verify_ek_certificate(&t.cert, &t.ek, &roots, far_future) {
        Err(EkCertError::Expired { not_after, .. }) => {
            assert_eq!(
                not_after,
                Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap()
            )
        }
        other => panic!("{other:?}"),
    }
    let y2000 = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
    match verify_ek_certificate(&t.cert, &t.ek, &roots, y2000) {
        Err(EkCertError::NotYetValid { not_before, .. }) => assert!(not_before > y2000),
        other => panic!("{other:?}"),
    }
}

#[test]
fn damaged_certificates_are_refused() {
    let t = Tpm::start();
    let roots = t.roots();
    for cut in [0, 1, 4, t.cert.len() / 2, t.cert.len() - 1] {
        assert!(
            matches!(
                verify_ek_certificate(&t.cert[..cut], &t.ek, &roots, now()),
                Err(EkCertError::Malformed { .. })
            ),
            "cut at {cut}"
        );
    }
    // The signature is the last field of the certificate.
    let mut flipped = t.cert.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    match verify_ek_certificate(&flipped, &t.ek, &roots, now()) {
        Err(EkCertError::BadSignature { subject }) => assert_eq!(subject, "CN=unknown"),
        other => panic!("{other:?}"),
    }
    // A changed byte inside the signed part breaks the signature too: the
    // subject CN "unknown" becomes "unknowm".
    let mut tampered = t.cert.clone();
    let cn_at = tampered
        .windows(7)
        .position(|w| w == b"unknown")
        .expect("swtpm's EK certificate subject is CN=unknown");
    tampered[cn_at + 6] = b'm';
    match verify_ek_certificate(&tampered, &t.ek, &roots, now()) {
        Err(EkCertError::BadSignature { subject }) => assert_eq!(subject, "CN=unknowm"),
        other => panic!("{other:?}"),
    }
}
