//! The virtual hosts' identities. Every key (EK, AK) is derived from one
//! random fleet seed kept in `DIR/sim/fleet.json` (mode 0600), so a fleet of
//! 100,000 hosts is enrolled once and measured again and again without
//! storing 200,000 key files. The mTLS certificates (from the pool's CA) and
//! EK certificates (from the simulator's own EK CA, `DIR/sim/ek-ca.pem`)
//! are issued afresh at each start: the server pins the EK and AK, not the
//! certificates.

use super::SimError;
use chrono::{Datelike, Utc};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use proto::tpm::{self, EccCurve, HashAlg, KeyScheme, Public, PublicKey};
use rand::RngCore;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SignatureAlgorithm,
    PKCS_ECDSA_P256_SHA256,
};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The TCG default EK policy (PolicySecret(TPM_RH_ENDORSEMENT)).
const EK_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// `DIR/sim/fleet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetState {
    /// hex of the 32-byte seed every host key is derived from.
    pub seed: String,
    /// Host names are `PREFIX-NNNNNN`.
    pub prefix: String,
    /// The most hosts any run used (informational).
    pub hosts: usize,
}

pub fn sim_dir(dir: &Path) -> PathBuf {
    dir.join("sim")
}

pub fn ek_ca_path(dir: &Path) -> PathBuf {
    sim_dir(dir).join("ek-ca.pem")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn pki(e: rcgen::Error) -> SimError {
    SimError::Pki(e.to_string())
}

/// Load `DIR/sim/fleet.json`, or create it (and the EK CA) on first use.
pub fn load_or_create(dir: &Path, prefix: &str, hosts: usize) -> Result<FleetState, SimError> {
    let sim = sim_dir(dir);
    std::fs::create_dir_all(&sim).map_err(io(&sim))?;
    let path = sim.join("fleet.json");
    let mut state = if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let state: FleetState = serde_json::from_str(&text).map_err(|e| SimError::State {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        if state.prefix != prefix {
            return Err(SimError::Config {
                key: "--prefix".into(),
                problem: format!(
                    "{} holds a fleet named {}-*; use that prefix or another --dir",
                    path.display(),
                    state.prefix
                ),
            });
        }
        state
    } else {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        FleetState {
            seed: hex::encode(seed),
            prefix: prefix.to_string(),
            hosts: 0,
        }
    };
    if hosts > state.hosts || !path.exists() {
        state.hosts = state.hosts.max(hosts);
        let text = serde_json::to_string_pretty(&state).unwrap_or_default();
        crate::pki::write(&path, &text, true).map_err(|e| SimError::State {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
    }
    ensure_ek_ca(dir)?;
    Ok(state)
}

/// Create the simulator's EK CA (`DIR/sim/ek-ca.pem`, `ek-ca.key`) unless
/// it exists; returns the certificate's path, to add to the server's `ek_ca`.
pub fn ensure_ek_ca(dir: &Path) -> Result<PathBuf, SimError> {
    let sim = sim_dir(dir);
    std::fs::create_dir_all(&sim).map_err(io(&sim))?;
    let cert_path = ek_ca_path(dir);
    if cert_path.exists() {
        return Ok(cert_path);
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        "attestctl simulate EK CA (load testing only)",
    );
    dn.push(DnType::OrganizationName, "simulated TPM manufacturer");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, 10);
    let cert = params.self_signed(&key).map_err(pki)?;
    let key_path = sim.join("ek-ca.key");
    let werr = |p: &Path| {
        let p = p.display().to_string();
        move |e: crate::error::Error| SimError::State {
            path: p.clone(),
            detail: e.to_string(),
        }
    };
    crate::pki::write(&key_path, &key.serialize_pem(), true).map_err(werr(&key_path))?;
    crate::pki::write(&cert_path, &cert.pem(), false).map_err(werr(&cert_path))?;
    Ok(cert_path)
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = Utc::now();
    params.not_before = rcgen::date_time_ymd(now.year(), now.month() as u8, now.day() as u8)
        - std::time::Duration::from_secs(86_400);
    params.not_after = rcgen::date_time_ymd(
        now.year() + years,
        now.month() as u8,
        now.day().min(28) as u8,
    );
}

/// A CA loaded from PEM files, able to issue.
pub struct Issuer {
    cert: Certificate,
    key: KeyPair,
}

impl Issuer {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, SimError> {
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let key_pem = std::fs::read_to_string(key_path).map_err(io(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(pki)?;
        // Re-create the issuer from its own subject and key: certificates it
        // signs chain to the file on disk by name, key identifier and signature.
        let cert = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(pki)?
            .self_signed(&key)
            .map_err(pki)?;
        Ok(Self { cert, key })
    }

    /// An agent client certificate (`OU=agent`, `CN=host`) and its key, DER.
    pub fn agent_cert(&self, host: &str) -> Result<(Vec<u8>, Vec<u8>), SimError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(pki)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, host);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "agent");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 1);
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(pki)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }

    /// An EK certificate for a P-256 EK point (uncompressed SEC1), DER.
    pub fn ek_cert(&self, host: &str, ek_point: &[u8]) -> Result<Vec<u8>, SimError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("simulated EK of {host}"));
        params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
        validity(&mut params, 1);
        let cert = params
            .signed_by(&EkPoint(ek_point), &self.cert, &self.key)
            .map_err(pki)?;
        Ok(cert.der().to_vec())
    }
}

/// An EK public key for rcgen: the SEC1 point of a P-256 key.
struct EkPoint<'a>(&'a [u8]);

impl PublicKeyData for EkPoint<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Derive a P-256 private key for (`label`, host index) from the seed.
pub fn derive_key(seed: &[u8], label: &str, index: usize) -> p256::SecretKey {
    let mut counter: u32 = 0;
    loop {
        let digest = Sha256::new()
            .chain_update(seed)
            .chain_update(label.as_bytes())
            .chain_update((index as u64).to_be_bytes())
            .chain_update(counter.to_be_bytes())
            .finalize();
        // Fails only for zero or values >= n (probability ~2^-32): try the next.
        if let Ok(k) = p256::SecretKey::from_slice(&digest) {
            return k;
        }
        counter = counter.wrapping_add(1);
    }
}

fn xy(key: &p256::SecretKey) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let point = key.public_key().to_encoded_point(false);
    let x = point.x().map(|c| c.to_vec()).unwrap_or_default();
    let y = point.y().map(|c| c.to_vec()).unwrap_or_default();
    (x, y, point.as_bytes().to_vec())
}

/// The EK public area of the TCG default ECC (NIST P-256) EK template.
pub fn ek_public(key: &p256::SecretKey) -> Result<(Public, Vec<u8>), SimError> {
    let (x, y, sec1) = xy(key);
    let mut t = Vec::with_capacity(128);
    t.extend(0x0023u16.to_be_bytes()); // TPM_ALG_ECC
    t.extend(HashAlg::Sha256.tpm_id().to_be_bytes());
    // fixedTPM, fixedParent, sensitiveDataOrigin, adminWithPolicy, restricted, decrypt
    t.extend(0x0003_00b2u32.to_be_bytes());
    t.extend((EK_POLICY.len() as u16).to_be_bytes());
    t.extend(EK_POLICY);
    t.extend([0x00, 0x06, 0x00, 0x80, 0x00, 0x43]); // AES-128-CFB
    t.extend([0x00, 0x10]); // scheme NULL
    t.extend([0x00, 0x03, 0x00, 0x10]); // NIST P-256, kdf NULL
    for c in [&x, &y] {
        t.extend((c.len() as u16).to_be_bytes());
        t.extend(c.iter());
    }
    let public = Public::decode_tpmt(&t).map_err(|e| SimError::Pki(e.to_string()))?;
    Ok((public, sec1))
}

/// The AK: an ECDSA-P256-SHA256 restricted signing key, as `tpm2_createak -G ecc`.
pub fn ak(key: &p256::SecretKey) -> Result<(Public, EcdsaKeyPair), SimError> {
    let (x, y, sec1) = xy(key);
    let public = tpm::ak_public(
        PublicKey::Ecc {
            curve: EccCurve::NistP256,
            x,
            y,
        },
        KeyScheme::Ecdsa(HashAlg::Sha256),
    );
    let signer = EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.to_bytes(),
        &sec1,
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|e| SimError::Pki(format!("AK key: {e}")))?;
    Ok((public, signer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_derived_deterministically_and_distinctly() {
        let seed = [7u8; 32];
        assert_eq!(
            derive_key(&seed, "ak", 3).to_bytes(),
            derive_key(&seed, "ak", 3).to_bytes()
        );
        assert_ne!(
            derive_key(&seed, "ak", 3).to_bytes(),
            derive_key(&seed, "ak", 4).to_bytes()
        );
        assert_ne!(
            derive_key(&seed, "ek", 3).to_bytes(),
            derive_key(&seed, "ak", 3).to_bytes()
        );
    }

    #[test]
    fn ek_and_ak_public_areas_have_the_tpm_attributes() {
        let (ek, _) = ek_public(&derive_key(&[1; 32], "ek", 0)).unwrap();
        assert!(ek.has(tpm::attr::RESTRICTED) && ek.has(tpm::attr::DECRYPT));
        assert!(!ek.has(tpm::attr::SIGN_ENCRYPT));
        assert_eq!(Public::decode(&ek.encode()).unwrap(), ek);
        let (ak, _) = ak(&derive_key(&[1; 32], "ak", 0)).unwrap();
        assert!(ak.has(tpm::attr::RESTRICTED) && ak.has(tpm::attr::SIGN_ENCRYPT));
        assert_eq!(ak.scheme, KeyScheme::Ecdsa(HashAlg::Sha256));
    }
}
