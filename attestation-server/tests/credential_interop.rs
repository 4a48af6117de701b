//! Interop of our TPM2_MakeCredential with a real TPM (swtpm): the TPM's
//! TPM2_ActivateCredential must recover the secret for the right AK and
//! refuse a credential made for any other AK name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Output;

use attestation_server::credential::{
    make_credential, parse_tpm2_tools_credential_file, tpm2_tools_credential_file, Credential,
};
use proto::tpm::Public;
use rand::RngCore;
use test_support::SwTpm;

/// A swtpm with an EK and an AK loaded, their files in a temp dir.
struct Tpm {
    tpm: SwTpm,
    dir: tempfile::TempDir,
}

impl Tpm {
    /// `ek_alg`/`ak_alg`: "rsa" or "ecc".
    fn start(ek_alg: &str, ak_alg: &str, ak_scheme: &str) -> Tpm {
        let tpm = Tpm {
            tpm: SwTpm::start().unwrap(),
            dir: tempfile::tempdir().unwrap(),
        };
        tpm.run(
            "tpm2_createek",
            &["-c", "ek.ctx", "-G", ek_alg, "-u", "ek.pub"],
        );
        tpm.run(
            "tpm2_createak",
            &[
                "-C", "ek.ctx", "-c", "ak.ctx", "-G", ak_alg, "-g", "sha256", "-s", ak_scheme,
                "-u", "ak.pub", "-n", "ak.name",
            ],
        );
        // swtpm has few transient object slots; contexts are reloaded on use.
        tpm.run("tpm2_flushcontext", &["-t"]);
        tpm
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    fn output(&self, program: &str, args: &[&str]) -> Output {
        self.tpm
            .tool(program, args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ek(&self) -> Public {
        Public::decode(&self.read("ek.pub")).unwrap()
    }

    fn ak_name(&self) -> Vec<u8> {
        let name = self.read("ak.name");
        // The name tpm2-tools wrote is the one our decoder computes.
        assert_eq!(name, Public::decode(&self.read("ak.pub")).unwrap().name());
        name
    }

    /// TPM2_ActivateCredential with the EK (its policy needs the endorsement
    /// hierarchy's secret, hence the policy session). Returns the recovered
    /// secret, or the tool's stderr if the TPM refused.
    fn activate(&self, credential: &Credential) -> Result<Vec<u8>, String> {
        self.activate_file(&tpm2_tools_credential_file(credential))
    }

    fn activate_file(&self, file: &[u8]) -> Result<Vec<u8>, String> {
        let input = self.path("cred.in");
        let output = self.path("secret.out");
        std::fs::write(&input, file).unwrap();
        let _ = std::fs::remove_file(&output);
        self.run(
            "tpm2_startauthsession",
            &["--policy-session", "-S", "session.ctx"],
        );
        self.run("tpm2_policysecret", &["-S", "session.ctx", "-c", "e"]);
        let out = self.output(
            "tpm2_activatecredential",
            &[
                "-c",
                "ak.ctx",
                "-C",
                "ek.ctx",
                "-i",
                path_str(&input),
                "-o",
                path_str(&output),
                "-P",
                "session:session.ctx",
            ],
        );
        // Free the session and the reloaded keys whatever the outcome.
        self.run("tpm2_flushcontext", &["-s"]);
        self.run("tpm2_flushcontext", &["-t"]);
        if out.status.success() {
            Ok(std::fs::read(&output).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn random_secret() -> Vec<u8> {
    let mut secret = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    secret
}

#[test]
fn tpm_activates_our_credential_for_an_rsa_ek() {
    let tpm = Tpm::start("rsa", "rsa", "rsassa");
    let ek = tpm.ek();
    let name = tpm.ak_name();
    let secret = random_secret();

    let credential = make_credential(&ek, &name, &secret, &mut rand::thread_rng()).unwrap();
    assert_eq!(tpm.activate(&credential).unwrap(), secret);

    // Made for another AK: the TPM's integrity check refuses it.
    let mut other_name = name.clone();
    other_name[10] ^= 0x01;
    let wrong = make_credential(&ek, &other_name, &secret, &mut rand::thread_rng()).unwrap();
    let err = tpm.activate(&wrong).unwrap_err();
    assert!(err.contains("integrity"), "unexpected refusal: {err}");

    // Tampered ciphertext: refused too.
    let mut tampered = credential.clone();
    let last = tampered.id_object.len() - 1;
    tampered.id_object[last] ^= 0x01;
    assert!(tpm.activate(&tampered).is_err());
}

#[test]
fn tpm_activates_our_credential_for_an_ecc_ek() {
    let tpm = Tpm::start("ecc", "ecc", "ecdsa");
    let ek = tpm.ek();
    let name = tpm.ak_name();
    let secret = random_secret();

    let credential = make_credential(&ek, &name, &secret, &mut rand::thread_rng()).unwrap();
    assert_eq!(tpm.activate(&credential).unwrap(), secret);

    let mut other_name = name.clone();
    other_name[33] ^= 0x80;
    let wrong = make_credential(&ek, &other_name, &secret, &mut rand::thread_rng()).unwrap();
    assert!(tpm.activate(&wrong).is_err());
}

#[test]
fn tpm2_makecredential_output_parses_and_survives_rewriting() {
    let tpm = Tpm::start("rsa", "rsa", "rsassa");
    let name = tpm.ak_name();
    let secret = random_secret();
    std::fs::write(tpm.path("secret.data"), &secret).unwrap();
    tpm.run(
        "tpm2_makecredential",
        &[
            "-T",
            "none",
            "-e",
            "ek.pub",
            "-s",
            "secret.data",
            "-n",
            &hex::encode(&name),
            "-o",
            "mkcred.out",
        ],
    );
    let file = tpm.read("mkcred.out");
    let theirs = parse_tpm2_tools_credential_file(&file).unwrap();
    assert_eq!(tpm2_tools_credential_file(&theirs), file);

    // Same structure sizes as ours for the same EK, name and secret.
    let ours = make_credential(&tpm.ek(), &name, &secret, &mut rand::thread_rng()).unwrap();
    assert_eq!(ours.id_object.len(), theirs.id_object.len());
    assert_eq!(ours.encrypted_secret.len(), theirs.encrypted_secret.len());

    // What we parsed is still the credential: the TPM activates it.
    assert_eq!(tpm.activate(&theirs).unwrap(), secret);
}
