//! TPM identity for enrollment against a real software TPM (swtpm): the EK
//! identity the agent reports (checked against tpm2-tools and the EK
//! certificate swtpm_setup stored), and credential activation of
//! credentials made by an independent implementation (tpm2_makecredential),
//! including ones that must fail, without leaving TPM objects or sessions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use host_agent::tpm::{AkInfo, Tpm, EK_CERT_RSA_NV_INDEX};
use host_agent::{AkType, Error};
use proto::tpm::{attr, Public, PublicKey};
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;
use test_support::SwTpm;

/// Generous: swtpm makes RSA keys in software on a small machine.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Header of a tpm2-tools credential file (`tpm2_makecredential -o`).
const CREDENTIAL_MAGIC: u32 = 0xBADC_C0DE;
const CREDENTIAL_VERSION: u32 = 1;

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

/// `tpm2_getcap handles-transient` and `handles-loaded-session`, trimmed:
/// both must be empty when the agent is idle.
fn leftovers(swtpm: &Arc<SwTpm>) -> (String, String) {
    let s = swtpm.clone();
    within_timeout("tpm2_getcap", move || {
        let objects = s.run_tool("tpm2_getcap", ["handles-transient"])?;
        let sessions = s.run_tool("tpm2_getcap", ["handles-loaded-session"])?;
        Ok((
            String::from_utf8_lossy(&objects.stdout).trim().to_string(),
            String::from_utf8_lossy(&sessions.stdout).trim().to_string(),
        ))
    })
}

fn assert_clean(swtpm: &Arc<SwTpm>, after: &str) {
    let (objects, sessions) = leftovers(swtpm);
    assert_eq!(objects, "", "transient objects left after {after}");
    assert_eq!(sessions, "", "sessions left after {after}");
}

/// A marshalled TPM2B at the start of `bytes`, with its size prefix, and
/// the rest.
fn split_tpm2b(bytes: &[u8]) -> (&[u8], &[u8]) {
    assert!(bytes.len() >= 2, "no TPM2B size field");
    let size = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    assert!(bytes.len() >= 2 + size, "TPM2B runs past the end");
    bytes.split_at(2 + size)
}

/// The credential `tpm2_makecredential -T none` makes for `ak_name` under
/// the EK public area in `ek_pub`: (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET),
/// each marshalled with its size prefix, as the server sends them.
fn make_credential(dir: &Path, ek_pub: &Path, secret: &[u8], ak_name: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let secret_file = dir.join("secret.bin");
    let out = dir.join("mkcred.out");
    std::fs::write(&secret_file, secret).unwrap();
    let _ = std::fs::remove_file(&out);
    let result = Command::new("tpm2_makecredential")
        .args(["-T", "none", "-u"])
        .arg(ek_pub)
        .arg("-s")
        .arg(&secret_file)
        .arg("-n")
        .arg(hex::encode(ak_name))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("tpm2_makecredential runs");
    assert!(
        result.status.success(),
        "tpm2_makecredential: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let file = std::fs::read(&out).unwrap();
    let (magic, rest) = file.split_at(4);
    assert_eq!(
        u32::from_be_bytes(magic.try_into().unwrap()),
        CREDENTIAL_MAGIC
    );
    let (version, rest) = rest.split_at(4);
    assert_eq!(
        u32::from_be_bytes(version.try_into().unwrap()),
        CREDENTIAL_VERSION
    );
    let (id_object, rest) = split_tpm2b(rest);
    let (encrypted_secret, rest) = split_tpm2b(rest);
    assert!(
        rest.is_empty(),
        "{} stray bytes after the credential",
        rest.len()
    );
    // An RSA-2048 EK encrypts the seed to exactly one 256-byte block.
    assert_eq!(encrypted_secret.len(), 2 + 256);
    (id_object.to_vec(), encrypted_secret.to_vec())
}

fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), secret.as_mut_slice());
    secret
}

fn check_ek_public(ek_public: &[u8]) -> Public {
    let public = Public::decode(ek_public).expect("EK public decodes with proto");
    assert!(
        matches!(public.key, PublicKey::Rsa { key_bits: 2048, .. }),
        "{:?}",
        public.key
    );
    assert!(public.has(attr::RESTRICTED) && public.has(attr::DECRYPT));
    assert!(!public.has(attr::SIGN_ENCRYPT));
    assert!(public.has(attr::FIXED_TPM) && public.has(attr::FIXED_PARENT));
    public
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ek_identity_is_the_tpms_ek_and_its_certificate() {
    let swtpm = Arc::new(SwTpm::start().expect("swtpm starts"));
    let state = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let tpm = Tpm::start(&swtpm.tcti(), AkType::Ecc, state.path()).unwrap();

    let ek = tpm.ek_identity().await.expect("EK identity");
    let s = swtpm.clone();
    let stored = within_timeout("tpm2_nvread", move || s.ek_cert_der());
    assert_eq!(
        ek.certificate.as_deref(),
        Some(stored.as_slice()),
        "the certificate is the DER in NV index {EK_CERT_RSA_NV_INDEX:#x}"
    );
    check_ek_public(&ek.public);

    // tpm2-tools derives the same EK from the same default template.
    let tools_pub = scratch.path().join("ek-tools.pub");
    let s = swtpm.clone();
    let ctx = scratch.path().join("ek.ctx");
    let out = tools_pub.clone();
    within_timeout("tpm2_createek", move || {
        s.run_tool(
            "tpm2_createek",
            [
                "-G".as_ref(),
                "rsa".as_ref(),
                "-c".as_ref(),
                ctx.as_os_str(),
                "-u".as_ref(),
                out.as_os_str(),
            ],
        )
    });
    assert_eq!(
        std::fs::read(&tools_pub).unwrap(),
        ek.public,
        "the EK public is what tpm2_createek reports"
    );
    // tpm2_createek leaves its EK loaded; only the agent's cleanliness is
    // under test.
    let s = swtpm.clone();
    within_timeout("tpm2_flushcontext", move || {
        s.run_tool("tpm2_flushcontext", ["-t"])
    });
    assert_clean(&swtpm, "reading the EK identity");

    // Asking again gives the same identity and leaves nothing behind.
    assert_eq!(tpm.ek_identity().await.expect("EK identity again"), ek);
    assert_clean(&swtpm, "reading the EK identity");

    // A TPM without an EK certificate: no certificate, not an error.
    let s = swtpm.clone();
    let index = format!("{EK_CERT_RSA_NV_INDEX:#x}");
    within_timeout("tpm2_nvundefine", move || {
        s.run_tool("tpm2_nvundefine", [index.as_str(), "-C", "p"])
    });
    let bare = tpm
        .ek_identity()
        .await
        .expect("EK identity without a certificate");
    assert_eq!(bare.certificate, None);
    assert_eq!(bare.public, ek.public);
    assert_clean(&swtpm, "reading the EK identity without a certificate");
    tpm.shutdown().await;
}

async fn activation_round_trip(ak_type: AkType) {
    let swtpm = Arc::new(SwTpm::start().expect("swtpm starts"));
    let state = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let tpm = Tpm::start(&swtpm.tcti(), ak_type, state.path()).unwrap();
    let ak: AkInfo = tpm.ensure_ak().await.expect("AK");
    let ek = tpm.ek_identity().await.expect("EK identity");
    let ek_pub = scratch.path().join("ek.pub");
    std::fs::write(&ek_pub, &ek.public).unwrap();

    // A credential for this AK under this EK: the TPM gives the secret back.
    let secret = random_secret();
    let (id_object, encrypted_secret) = make_credential(scratch.path(), &ek_pub, &secret, &ak.name);
    let recovered = tpm
        .activate_credential(&id_object, &encrypted_secret)
        .await
        .expect("activation");
    assert_eq!(recovered, secret, "the recovered secret is secret.bin");
    assert_clean(&swtpm, "activation");

    // Each credential has its own seed and secret.
    let other_secret = random_secret();
    let (id2, secret2) = make_credential(scratch.path(), &ek_pub, &other_secret, &ak.name);
    assert_ne!(id2, id_object);
    assert_eq!(
        tpm.activate_credential(&id2, &secret2).await.unwrap(),
        other_secret
    );

    // A credential for another AK name: the TPM refuses (integrity check).
    let mut other_name = ak.name.clone();
    let last = other_name.len() - 1;
    other_name[last] ^= 1;
    let (id_object_other, encrypted_other) =
        make_credential(scratch.path(), &ek_pub, &random_secret(), &other_name);
    let outcome = tpm
        .activate_credential(&id_object_other, &encrypted_other)
        .await;
    assert!(
        matches!(
            outcome,
            Err(Error::Tpm {
                operation: "activate credential",
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_clean(&swtpm, "a refused activation");

    // A tampered credential blob or seed: refused too.
    let mut tampered = id_object.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x80;
    let outcome = tpm.activate_credential(&tampered, &encrypted_secret).await;
    assert!(matches!(outcome, Err(Error::Tpm { .. })), "{outcome:?}");
    let mut tampered = encrypted_secret.clone();
    tampered[10] ^= 0x01;
    let outcome = tpm.activate_credential(&id_object, &tampered).await;
    assert!(matches!(outcome, Err(Error::Tpm { .. })), "{outcome:?}");
    assert_clean(&swtpm, "activations of tampered credentials");

    // Badly framed input never reaches the TPM.
    let outcome = tpm
        .activate_credential(&id_object[2..], &encrypted_secret)
        .await;
    assert!(
        matches!(
            outcome,
            Err(Error::Enrollment {
                field: "credential_blob",
                ..
            })
        ),
        "{outcome:?}"
    );

    // After the refusals the worker still activates genuine credentials.
    assert_eq!(
        tpm.activate_credential(&id_object, &encrypted_secret)
            .await
            .unwrap(),
        secret
    );
    tpm.shutdown().await;
    assert_clean(&swtpm, "shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm2_tools_credential_for_rsa_ak_activates() {
    activation_round_trip(AkType::Rsa).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm2_tools_credential_for_ecc_ak_activates() {
    activation_round_trip(AkType::Ecc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_for_another_tpms_ek_is_refused() {
    let ours = Arc::new(SwTpm::start().expect("swtpm starts"));
    let theirs = SwTpm::start().expect("second swtpm starts");
    let state = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let tpm = Tpm::start(&ours.tcti(), AkType::Ecc, state.path()).unwrap();
    let ak = tpm.ensure_ak().await.expect("AK");

    // The other TPM's EK, with our AK's name: what a server would make if
    // an impostor presented our AK with its own EK.
    let their_ek = scratch.path().join("their-ek.pub");
    let ctx = scratch.path().join("their-ek.ctx");
    theirs
        .run_tool(
            "tpm2_createek",
            [
                "-G".as_ref(),
                "rsa".as_ref(),
                "-c".as_ref(),
                ctx.as_os_str(),
                "-u".as_ref(),
                their_ek.as_os_str(),
            ],
        )
        .unwrap();
    let ek = tpm.ek_identity().await.unwrap();
    assert_ne!(std::fs::read(&their_ek).unwrap(), ek.public);
    let (id_object, encrypted_secret) =
        make_credential(scratch.path(), &their_ek, &random_secret(), &ak.name);
    let outcome = tpm.activate_credential(&id_object, &encrypted_secret).await;
    assert!(
        matches!(
            outcome,
            Err(Error::Tpm {
                operation: "activate credential",
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_clean(&ours, "a refused activation");
    tpm.shutdown().await;
}
