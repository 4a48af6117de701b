//! The TPM worker against a real software TPM (swtpm): AK creation and
//! reuse, quotes checked with proto's decoders and with tpm2_checkquote
//! (tpm2-tools, an independent implementation), connection release between
//! requests, and flushing of every transient object.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use host_agent::tpm::{AkInfo, Quote, Tpm};
use host_agent::{AkType, Error};
use proto::tpm::{attr, pcr_digest, Attest, EccCurve, KeyScheme, Public, PublicKey, Signature};
use proto::wire::PcrSelectionMap;
use proto::HashAlg;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;
use test_support::SwTpm;

/// Generous: swtpm makes RSA keys in software on a small machine.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn sha256_0_to_10() -> PcrSelectionMap {
    [(HashAlg::Sha256, (0..=10).collect())].into()
}

fn random_nonce() -> Vec<u8> {
    let mut nonce = vec![0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), nonce.as_mut_slice());
    nonce
}

/// Run a blocking tpm2-tools call on another thread and fail (instead of
/// hanging) if it does not finish: it would hang if the agent kept the
/// swtpm connection.
fn within_timeout<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(TOOL_TIMEOUT) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what} failed: {e:#}"),
        Err(_) => panic!("{what} did not finish within {TOOL_TIMEOUT:?}: TPM connection held?"),
    }
}

fn shared(swtpm: SwTpm) -> std::sync::Arc<SwTpm> {
    std::sync::Arc::new(swtpm)
}

fn transient_handles(swtpm: &std::sync::Arc<SwTpm>) -> String {
    let s = swtpm.clone();
    within_timeout("tpm2_getcap handles-transient", move || {
        let out = s.run_tool("tpm2_getcap", ["handles-transient"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

fn pcr_read(swtpm: &std::sync::Arc<SwTpm>, index: u8) -> String {
    let s = swtpm.clone();
    within_timeout("tpm2_pcrread", move || s.pcr_read("sha256", index))
}

fn check_ak_public(ak: &AkInfo, ak_type: AkType) -> Public {
    let public = Public::decode(&ak.public).expect("AK public decodes with proto");
    assert_eq!(public.name(), ak.name, "name is nameAlg || H(TPMT_PUBLIC)");
    assert!(public.has(attr::RESTRICTED) && public.has(attr::SIGN_ENCRYPT));
    assert!(!public.has(attr::DECRYPT));
    assert!(public.has(attr::FIXED_TPM) && public.has(attr::FIXED_PARENT));
    match ak_type {
        AkType::Rsa => {
            assert!(matches!(public.key, PublicKey::Rsa { key_bits: 2048, .. }));
            assert_eq!(public.scheme, KeyScheme::RsaSsa(HashAlg::Sha256));
        }
        AkType::Ecc => {
            assert!(matches!(
                public.key,
                PublicKey::Ecc {
                    curve: EccCurve::NistP256,
                    ..
                }
            ));
            assert_eq!(public.scheme, KeyScheme::Ecdsa(HashAlg::Sha256));
        }
    }
    public
}

/// Check a quote with proto's decoders: nonce, selection, PCR digest.
fn check_quote(quote: &Quote, nonce: &[u8], ak_type: AkType) -> Attest {
    let attest = Attest::decode(&quote.attest).expect("attest decodes");
    assert_eq!(attest.extra_data, nonce, "extraData is the nonce");
    assert_eq!(
        attest.quote.pcr_select.normalized(),
        vec![(HashAlg::Sha256, (0..=10).collect())],
        "the quote covers sha256 PCRs 0-10"
    );
    let bank = &quote.pcrs[&HashAlg::Sha256];
    assert_eq!(
        bank.keys().copied().collect::<Vec<u8>>(),
        (0..=10).collect::<Vec<u8>>()
    );
    let values: Vec<Vec<u8>> = bank.values().map(|v| hex::decode(v).unwrap()).collect();
    assert!(values.iter().all(|v| v.len() == 32));
    assert_eq!(
        pcr_digest(HashAlg::Sha256, values.iter().map(Vec::as_slice)),
        attest.quote.pcr_digest,
        "pcrDigest matches the returned PCR values"
    );
    let signature = Signature::decode(&quote.signature).expect("signature decodes");
    match ak_type {
        AkType::Rsa => assert!(matches!(
            signature,
            Signature::RsaSsa {
                hash: HashAlg::Sha256,
                ..
            }
        )),
        AkType::Ecc => assert!(matches!(
            signature,
            Signature::Ecdsa {
                hash: HashAlg::Sha256,
                ..
            }
        )),
    }
    attest
}

/// tpm2_checkquote: signature over the attest with the AK, and the nonce.
fn checkquote(dir: &Path, ak: &AkInfo, attest: &[u8], signature: &[u8], nonce: &[u8]) -> bool {
    let ak_pub = dir.join("ak.pub");
    let msg = dir.join("quote.msg");
    let sig = dir.join("quote.sig");
    std::fs::write(&ak_pub, &ak.public).unwrap();
    std::fs::write(&msg, attest).unwrap();
    std::fs::write(&sig, signature).unwrap();
    let out = std::process::Command::new("tpm2_checkquote")
        .arg("-u")
        .arg(&ak_pub)
        .arg("-m")
        .arg(&msg)
        .arg("-s")
        .arg(&sig)
        .arg("-q")
        .arg(hex::encode(nonce))
        .output()
        .expect("tpm2_checkquote runs");
    out.status.success()
}

async fn ak_lifecycle_and_quotes(ak_type: AkType) {
    let swtpm = shared(SwTpm::start().expect("swtpm starts"));
    let state = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();

    // First start: a new AK, stored in the state directory.
    let tpm = Tpm::start(&swtpm.tcti(), ak_type, state.path()).unwrap();
    let ak = tpm.ensure_ak().await.expect("AK created");
    assert!(ak.created);
    assert_eq!(ak.ak_type, ak_type);
    check_ak_public(&ak, ak_type);
    let name = ak_type.name();
    let stored_pub = std::fs::read(state.path().join(format!("ak-{name}.pub"))).unwrap();
    assert_eq!(
        stored_pub, ak.public,
        "the public blob is the enrolled TPM2B_PUBLIC"
    );
    assert!(state.path().join(format!("ak-{name}.priv")).is_file());
    assert_eq!(
        transient_handles(&swtpm),
        "",
        "EK and AK flushed after creation"
    );

    // A quote, checked by proto and by tpm2-tools.
    let nonce = random_nonce();
    let quote = tpm.quote(&nonce, &sha256_0_to_10()).await.expect("quote");
    let attest = check_quote(&quote, &nonce, ak_type);
    assert!(checkquote(
        scratch.path(),
        &ak,
        &quote.attest,
        &quote.signature,
        &nonce
    ));
    // The oracle can fail: wrong nonce, tampered attest.
    assert!(!checkquote(
        scratch.path(),
        &ak,
        &quote.attest,
        &quote.signature,
        &random_nonce()
    ));
    let mut tampered = quote.attest.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(!checkquote(
        scratch.path(),
        &ak,
        &tampered,
        &quote.signature,
        &nonce
    ));
    // The values are the TPM's, as tpm2_pcrread sees them.
    for index in [0u8, 7, 10] {
        assert_eq!(
            quote.pcrs[&HashAlg::Sha256][&index],
            pcr_read(&swtpm, index)
        );
    }
    assert_eq!(
        transient_handles(&swtpm),
        "",
        "EK and AK flushed after the quote"
    );

    // The worker released the connection: another client gets the TPM
    // while our worker is idle, and the next quote sees its extend.
    let before = quote.pcrs[&HashAlg::Sha256][&10].clone();
    let extend = hex::encode(HashAlg::Sha256.hash(&[b"host-agent test"]));
    let s = swtpm.clone();
    let e = extend.clone();
    within_timeout("tpm2_pcrextend", move || s.pcr_extend(10, "sha256", &e));
    let expected = hex::encode(HashAlg::Sha256.hash(&[
        &hex::decode(&before).unwrap(),
        &hex::decode(&extend).unwrap(),
    ]));
    let nonce2 = random_nonce();
    let quote2 = tpm
        .quote(&nonce2, &sha256_0_to_10())
        .await
        .expect("second quote");
    let attest2 = check_quote(&quote2, &nonce2, ak_type);
    assert_eq!(quote2.pcrs[&HashAlg::Sha256][&10], expected);
    assert_ne!(attest2.quote.pcr_digest, attest.quote.pcr_digest);
    assert_eq!(
        quote2.pcrs[&HashAlg::Sha256][&0],
        quote.pcrs[&HashAlg::Sha256][&0]
    );
    assert!(checkquote(
        scratch.path(),
        &ak,
        &quote2.attest,
        &quote2.signature,
        &nonce2
    ));
    tpm.shutdown().await;

    // Restart (a new worker thread): the stored AK is loaded, not replaced.
    let tpm = Tpm::start(&swtpm.tcti(), ak_type, state.path()).unwrap();
    let again = tpm.ensure_ak().await.expect("AK loaded");
    assert!(!again.created, "the stored AK is reused");
    assert_eq!(again.name, ak.name);
    assert_eq!(again.public, ak.public);
    let nonce3 = random_nonce();
    let quote3 = tpm
        .quote(&nonce3, &sha256_0_to_10())
        .await
        .expect("quote after restart");
    check_quote(&quote3, &nonce3, ak_type);
    assert!(checkquote(
        scratch.path(),
        &ak,
        &quote3.attest,
        &quote3.signature,
        &nonce3
    ));
    tpm.shutdown().await;
    assert_eq!(transient_handles(&swtpm), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_ak_is_created_reused_and_its_quotes_verify() {
    ak_lifecycle_and_quotes(AkType::Rsa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecc_ak_is_created_reused_and_its_quotes_verify() {
    ak_lifecycle_and_quotes(AkType::Ecc).await;
}

async fn quote_ok(tpm: &Tpm) {
    let nonce = random_nonce();
    let quote = tpm.quote(&nonce, &sha256_0_to_10()).await.expect("quote");
    check_quote(&quote, &nonce, AkType::Rsa);
}

/// The agent creates the EK once and then uses the persistent EK at
/// 0x81010001 while it has the same name; a TPM without it, or with another
/// key there, still quotes (the EK is created again), and nothing is left
/// loaded either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_ek_is_used_only_when_it_is_the_same_key() {
    let swtpm = shared(SwTpm::start().expect("swtpm starts"));
    let state = tempfile::tempdir().unwrap();
    let tpm = Tpm::start(&swtpm.tcti(), AkType::Rsa, state.path()).unwrap();
    tpm.ensure_ak().await.expect("AK");
    let tool = |args: Vec<String>| {
        let s = swtpm.clone();
        within_timeout("tpm2 tool", move || {
            let out = s.run_tool(&args[0], &args[1..])?;
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(
        tool(args(&["tpm2_getcap", "handles-persistent"])).contains("0x81010001"),
        "swtpm_setup made the RSA EK persistent"
    );
    quote_ok(&tpm).await;
    quote_ok(&tpm).await;
    assert_eq!(transient_handles(&swtpm), "");

    // No persistent EK: the agent creates it for each use.
    tool(args(&["tpm2_evictcontrol", "-C", "o", "-c", "0x81010001"]));
    quote_ok(&tpm).await;
    assert_eq!(transient_handles(&swtpm), "");

    // Another key at the EK's handle (an owner's mistake, or an attacker's
    // decoy): its name differs, so the agent does not use it.
    let ctx = state.path().join("other.ctx").display().to_string();
    tool(args(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "rsa2048",
        "-c",
        &ctx,
    ]));
    tool(args(&[
        "tpm2_evictcontrol",
        "-C",
        "o",
        "-c",
        &ctx,
        "0x81010001",
    ]));
    tool(args(&["tpm2_flushcontext", "-t"]));
    quote_ok(&tpm).await;
    assert_eq!(transient_handles(&swtpm), "");
    tpm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_stored_ak_is_replaced_and_bad_requests_fail_cleanly() {
    let swtpm = shared(SwTpm::start().expect("swtpm starts"));
    let state = tempfile::tempdir().unwrap();
    // Well-framed TPM2Bs that are not a key of this TPM.
    let mut junk_pub = vec![0u8, 64];
    junk_pub.extend([7u8; 64]);
    std::fs::write(state.path().join("ak-ecc.pub"), &junk_pub).unwrap();
    std::fs::write(state.path().join("ak-ecc.priv"), [0u8, 4, 1, 2, 3, 4]).unwrap();

    let tpm = Tpm::start(&swtpm.tcti(), AkType::Ecc, state.path()).unwrap();
    let ak = tpm.ensure_ak().await.expect("a new AK replaces the junk");
    assert!(ak.created);
    check_ak_public(&ak, AkType::Ecc);
    assert_eq!(
        std::fs::read(state.path().join("ak-ecc.pub")).unwrap(),
        ak.public
    );

    // A bank the TPM does not have (swtpm allocates sha256 only): an error,
    // neither a hang nor a quote over another selection.
    let sha1: PcrSelectionMap = [(HashAlg::Sha1, vec![0, 1])].into();
    let outcome = tokio::time::timeout(TOOL_TIMEOUT, tpm.quote(&random_nonce(), &sha1))
        .await
        .expect("the quote answers");
    assert!(matches!(outcome, Err(Error::Tpm { .. })), "{outcome:?}");

    // A nonce longer than TPM2B_DATA holds, and an impossible PCR index.
    let outcome = tpm.quote(&[1u8; 100], &sha256_0_to_10()).await;
    assert!(
        matches!(outcome, Err(Error::Challenge { field: "nonce", .. })),
        "{outcome:?}"
    );
    let pcr_30: PcrSelectionMap = [(HashAlg::Sha256, vec![30])].into();
    let outcome = tpm.quote(&random_nonce(), &pcr_30).await;
    assert!(
        matches!(
            outcome,
            Err(Error::Challenge {
                field: "pcr_selection",
                ..
            })
        ),
        "{outcome:?}"
    );

    // Errors left nothing behind, and the worker still serves quotes.
    assert_eq!(transient_handles(&swtpm), "");
    let nonce = random_nonce();
    let quote = tpm.quote(&nonce, &sha256_0_to_10()).await.expect("quote");
    check_quote(&quote, &nonce, AkType::Ecc);
    tpm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_tpm_is_a_transient_error() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = tempfile::tempdir().unwrap();
    let tpm = Tpm::start(
        &format!("swtpm:host=127.0.0.1,port={port}"),
        AkType::Rsa,
        state.path(),
    )
    .unwrap();
    let outcome = tpm.ensure_ak().await;
    match outcome {
        Err(e @ Error::Tpm { .. }) => assert!(e.is_transient()),
        other => panic!("expected a TPM error, got {other:?}"),
    }
    assert!(!state.path().join("ak-rsa.pub").exists());
    tpm.shutdown().await;
}
