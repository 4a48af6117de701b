//! EK certificate validation: the TPM manufacturer's certificate for the
//! endorsement key must chain to a configured EK CA, and must certify the
//! very EK the agent sent.
//!
//! TPM EK certificates (TCG EK Credential Profile) have an empty subject, a
//! critical subjectAltName made of TPM manufacturer attributes and the EKU
//! 2.23.133.8.1; WebPKI verifiers refuse those, so the chain is built and
//! checked here: issuer/subject DN (and key identifier) matching, signatures
//! with ring, validity periods, CA constraints and a bounded depth.
//! Revocation (CRLs) and certificate policies are not evaluated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use proto::tpm::{EccCurve, Public, PublicKey};
use ring::signature as sig;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_NIST_EC_P384, OID_NIST_HASH_SHA256, OID_NIST_HASH_SHA384,
    OID_NIST_HASH_SHA512, OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
    OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate, X509Name};
use x509_parser::public_key::PublicKey as SpkiKey;
use x509_parser::signature_algorithm::SignatureAlgorithm;

/// At most this many CA certificates above the EK certificate (root included).
pub const MAX_CHAIN_DEPTH: usize = 5;

/// Extensions whose meaning is handled here (or harmless to accept), so
/// they may be critical: basicConstraints, keyUsage, extKeyUsage,
/// subjectAltName, subject/authority key id, certificatePolicies,
/// subjectDirectoryAttributes (the TPM's security assertions).
const HANDLED_CRITICAL_EXTENSIONS: &[&str] = &[
    "2.5.29.19",
    "2.5.29.15",
    "2.5.29.37",
    "2.5.29.17",
    "2.5.29.14",
    "2.5.29.35",
    "2.5.29.32",
    "2.5.29.9",
];

/// Files with these extensions are read from a CA directory; others (a
/// README, say) are skipped. Files named explicitly are always read.
const CERT_FILE_EXTENSIONS: &[&str] = &["pem", "crt", "cer", "der"];

#[derive(Debug, thiserror::Error)]
pub enum EkCertError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no certificate found", path.display())]
    NoCertificates { path: PathBuf },
    #[error("malformed certificate: {detail}")]
    Malformed { detail: String },
    #[error("issuer \"{issuer}\" is not among the trusted EK CA certificates")]
    UnknownIssuer { issuer: String },
    #[error("certificate \"{subject}\" expired at {not_after}")]
    Expired {
        subject: String,
        not_after: DateTime<Utc>,
    },
    #[error("certificate \"{subject}\" is not valid before {not_before}")]
    NotYetValid {
        subject: String,
        not_before: DateTime<Utc>,
    },
    #[error("the signature on certificate \"{subject}\" does not verify")]
    BadSignature { subject: String },
    #[error("certificate \"{subject}\" is signed with unsupported algorithm {algorithm}")]
    UnsupportedSignature { subject: String, algorithm: String },
    #[error("issuer certificate \"{subject}\" is not a CA")]
    NotCa { subject: String },
    #[error("CA certificate \"{subject}\" allows {path_len} CA certificates below it, the chain has more")]
    PathLenExceeded { subject: String, path_len: u32 },
    #[error("chain longer than {max} CA certificates")]
    ChainTooLong { max: usize },
    #[error("certificate \"{subject}\" has unsupported critical extension {oid}")]
    UnsupportedCriticalExtension { subject: String, oid: String },
    #[error("the EK certificate does not certify the EK that was sent")]
    KeyMismatch,
    #[error("unsupported EK certificate key: {detail}")]
    UnsupportedKey { detail: String },
}

/// What a verified EK certificate says, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkCertInfo {
    /// The EK certificate's issuer DN.
    pub issuer: String,
    /// Its subject DN (usually empty for EK certificates).
    pub subject: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_after: DateTime<Utc>,
    /// Subject DN of the trust anchor the chain ended at.
    pub root: String,
}

/// The EK CA certificates: self-signed ones are trust anchors, all others
/// are intermediates that count only when they chain to an anchor.
#[derive(Debug, Clone, Default)]
pub struct EkRoots {
    certs: Vec<CaCert>,
    /// Normalized subject DN -> indexes into `certs`.
    by_subject: HashMap<String, Vec<usize>>,
}

#[derive(Debug, Clone)]
struct CaCert {
    der: Vec<u8>,
    is_root: bool,
}

impl EkRoots {
    /// Load every certificate (PEM, possibly several per file, or DER) from
    /// the given files and directories (not recursive).
    pub fn load(paths: &[PathBuf]) -> Result<EkRoots, EkCertError> {
        let mut roots = EkRoots::default();
        for path in paths {
            let meta = std::fs::metadata(path).map_err(|source| EkCertError::Io {
                path: path.clone(),
                source,
            })?;
            if meta.is_dir() {
                for file in cert_files_in(path)? {
                    roots.add_file(&file, false)?;
                }
            } else {
                roots.add_file(path, true)?;
            }
        }
        // No paths is a valid (if strict) configuration: no EK certificate
        // chains. Paths that hold no certificate are a mistake.
        if roots.certs.is_empty() && !paths.is_empty() {
            let path = paths.first().cloned().unwrap_or_default();
            return Err(EkCertError::NoCertificates { path });
        }
        Ok(roots)
    }

    /// Build from DER certificates already in memory.
    pub fn from_der<I: IntoIterator<Item = Vec<u8>>>(certs: I) -> Result<EkRoots, EkCertError> {
        let mut roots = EkRoots::default();
        for der in certs {
            roots.add_der(der, "in-memory certificate")?;
        }
        Ok(roots)
    }

    /// Number of trust anchors.
    pub fn root_count(&self) -> usize {
        self.certs.iter().filter(|c| c.is_root).count()
    }

    /// Number of intermediate CA certificates.
    pub fn intermediate_count(&self) -> usize {
        self.certs.len() - self.root_count()
    }

    /// `explicit`: named by the operator, so it must hold a certificate;
    /// in a directory, PEM files with none (the CA's key, say) are skipped.
    fn add_file(&mut self, path: &Path, explicit: bool) -> Result<(), EkCertError> {
        let bytes = std::fs::read(path).map_err(|source| EkCertError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            let mut found = 0usize;
            for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
                let pem = pem.map_err(|e| EkCertError::Malformed {
                    detail: format!("{origin}: {e}"),
                })?;
                if pem.label == "CERTIFICATE" {
                    found += 1;
                    self.add_der(pem.contents, &origin)?;
                }
            }
            if found == 0 && explicit {
                return Err(EkCertError::NoCertificates {
                    path: path.to_path_buf(),
                });
            }
        } else {
            self.add_der(bytes, &origin)?;
        }
        Ok(())
    }

    fn add_der(&mut self, der: Vec<u8>, origin: &str) -> Result<(), EkCertError> {
        if self.certs.iter().any(|c| c.der == der) {
            return Ok(());
        }
        let cert = parse_strict(&der).map_err(|e| EkCertError::Malformed {
            detail: format!("{origin}: {e}"),
        })?;
        let subject_key = name_key(cert.subject());
        let self_issued = name_key(cert.issuer()) == subject_key
            && key_ids_agree(authority_key_id(&cert), subject_key_id(&cert));
        // An anchor's own signature adds no trust, but a self-issued
        // certificate whose signature is wrong is corrupt: refuse it early.
        if self_issued {
            if let Err(SigError::Bad) = verify_signed_by(&cert, &cert) {
                return Err(EkCertError::Malformed {
                    detail: format!(
                        "{origin}: self-signed certificate \"{}\" has a bad signature",
                        describe(&cert)
                    ),
                });
            }
        }
        let index = self.certs.len();
        self.by_subject.entry(subject_key).or_default().push(index);
        self.certs.push(CaCert {
            der,
            is_root: self_issued,
        });
        Ok(())
    }
}

fn cert_files_in(dir: &Path) -> Result<Vec<PathBuf>, EkCertError> {
    let io = |source| EkCertError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CERT_FILE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    // Deterministic order, so errors name the same file every time.
    files.sort();
    Ok(files)
}

/// Verify the EK certificate `der` against `roots` at time `now`, and that
/// it certifies `ek` (the EK public area the agent sent).
pub fn verify_ek_certificate(
    der: &[u8],
    ek: &Public,
    roots: &EkRoots,
    now: DateTime<Utc>,
) -> Result<EkCertInfo, EkCertError> {
    let leaf = parse_strict(der).map_err(|detail| EkCertError::Malformed { detail })?;
    check_critical_extensions(&leaf)?;
    check_validity(&leaf, now)?;

    let mut current = leaf.clone();
    let mut cas_below = 0usize;
    let root = loop {
        let (index, issuer) = find_issuer(&current, roots)?;
        check_critical_extensions(&issuer)?;
        check_validity(&issuer, now)?;
        check_ca(&issuer, cas_below)?;
        if roots.certs[index].is_root {
            break issuer.subject().to_string();
        }
        cas_below += 1;
        if cas_below >= MAX_CHAIN_DEPTH {
            return Err(EkCertError::ChainTooLong {
                max: MAX_CHAIN_DEPTH,
            });
        }
        current = issuer;
    };

    check_key(&leaf, ek)?;
    Ok(EkCertInfo {
        issuer: leaf.issuer().to_string(),
        subject: leaf.subject().to_string(),
        serial: hex::encode(leaf.raw_serial()),
        not_after: to_datetime(leaf.validity().not_after.timestamp()),
        root,
    })
}

/// Parse one DER certificate. Zero padding after it is tolerated: some TPMs
/// keep the certificate in a larger, zero-filled NV index.
fn parse_strict(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    if rest.iter().any(|b| *b != 0) {
        return Err(format!("{} bytes after the certificate", rest.len()));
    }
    Ok(cert)
}

/// The subject for error messages; EK certificates have an empty one, so
/// name them by serial.
fn describe(cert: &X509Certificate<'_>) -> String {
    if cert.subject().iter_rdn().next().is_none() {
        format!("serial {} (empty subject)", hex::encode(cert.raw_serial()))
    } else {
        cert.subject().to_string()
    }
}

/// A DN for comparison: attribute types and values, case and whitespace
/// folded, so a PrintableString and a UTF8String of the same text match
/// (RFC 5280 §7.1).
fn name_key(name: &X509Name<'_>) -> String {
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let value = match atv.as_str() {
                        Ok(s) => s
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                            .to_lowercase(),
                        Err(_) => hex::encode(atv.as_slice()),
                    };
                    format!("{}={}", atv.attr_type().to_id_string(), value)
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn authority_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        })
}

fn subject_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0),
            _ => None,
        })
}

/// Key identifiers only rule a candidate out when both are present.
fn key_ids_agree(aki: Option<&[u8]>, ski: Option<&[u8]>) -> bool {
    match (aki, ski) {
        (Some(a), Some(s)) => a == s,
        _ => true,
    }
}

/// The CA certificate in `roots` that signed `cert`.
fn find_issuer<'r>(
    cert: &X509Certificate<'_>,
    roots: &'r EkRoots,
) -> Result<(usize, X509Certificate<'r>), EkCertError> {
    let aki = authority_key_id(cert);
    let mut failure = None;
    let candidates = roots
        .by_subject
        .get(&name_key(cert.issuer()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    for &index in candidates {
        let Some(entry) = roots.certs.get(index) else {
            continue;
        };
        // Parsed once already when loaded.
        let candidate =
            parse_strict(&entry.der).map_err(|detail| EkCertError::Malformed { detail })?;
        if !key_ids_agree(aki, subject_key_id(&candidate)) {
            continue;
        }
        match verify_signed_by(cert, &candidate) {
            Ok(()) => return Ok((index, candidate)),
            Err(e) => failure = Some(e),
        }
    }
    Err(match failure {
        None => EkCertError::UnknownIssuer {
            issuer: cert.issuer().to_string(),
        },
        Some(SigError::Bad) => EkCertError::BadSignature {
            subject: describe(cert),
        },
        Some(SigError::Unsupported(algorithm)) => EkCertError::UnsupportedSignature {
            subject: describe(cert),
            algorithm,
        },
    })
}

enum SigError {
    Bad,
    Unsupported(String),
}

/// Check `cert`'s signature with `issuer`'s public key.
fn verify_signed_by(
    cert: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
) -> Result<(), SigError> {
    let alg = &cert.signature_algorithm;
    // The signed copy of the algorithm must be the one used.
    if cert.tbs_certificate.signature.algorithm != alg.algorithm {
        return Err(SigError::Bad);
    }
    let oid = &alg.algorithm;
    let key_alg = &issuer.public_key().algorithm;
    let unsupported = || SigError::Unsupported(oid.to_id_string());
    let verification: &'static dyn sig::VerificationAlgorithm = if *oid == OID_PKCS1_SHA256WITHRSA {
        &sig::RSA_PKCS1_2048_8192_SHA256
    } else if *oid == OID_PKCS1_SHA384WITHRSA {
        &sig::RSA_PKCS1_2048_8192_SHA384
    } else if *oid == OID_PKCS1_SHA512WITHRSA {
        &sig::RSA_PKCS1_2048_8192_SHA512
    } else if *oid == OID_PKCS1_RSASSAPSS {
        rsa_pss(alg).ok_or_else(unsupported)?
    } else if *oid == OID_SIG_ECDSA_WITH_SHA256 || *oid == OID_SIG_ECDSA_WITH_SHA384 {
        let sha384 = *oid == OID_SIG_ECDSA_WITH_SHA384;
        let curve = key_alg
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(unsupported)?;
        match (curve == OID_EC_P256, curve == OID_NIST_EC_P384, sha384) {
            (true, _, false) => &sig::ECDSA_P256_SHA256_ASN1,
            (true, _, true) => &sig::ECDSA_P256_SHA384_ASN1,
            (_, true, false) => &sig::ECDSA_P384_SHA256_ASN1,
            (_, true, true) => &sig::ECDSA_P384_SHA384_ASN1,
            _ => return Err(unsupported()),
        }
    } else {
        return Err(unsupported());
    };
    let key =
        sig::UnparsedPublicKey::new(verification, &issuer.public_key().subject_public_key.data);
    key.verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .map_err(|_| SigError::Bad)
}

/// RSASSA-PSS as ring verifies it: MGF1 with the message hash and a salt as
/// long as the digest (what TPMs and common CAs use).
fn rsa_pss(
    alg: &x509_parser::x509::AlgorithmIdentifier<'_>,
) -> Option<&'static dyn sig::VerificationAlgorithm> {
    let SignatureAlgorithm::RSASSA_PSS(params) = SignatureAlgorithm::try_from(alg).ok()? else {
        return None;
    };
    let hash = params.hash_algorithm_oid();
    let mgf = params.mask_gen_algorithm().ok()?;
    const MGF1: &str = "1.2.840.113549.1.1.8";
    if mgf.mgf.to_id_string() != MGF1 || mgf.hash != *hash || params.trailer_field() != 1 {
        return None;
    }
    let salt = params.salt_length();
    if *hash == OID_NIST_HASH_SHA256 && salt == 32 {
        Some(&sig::RSA_PSS_2048_8192_SHA256)
    } else if *hash == OID_NIST_HASH_SHA384 && salt == 48 {
        Some(&sig::RSA_PSS_2048_8192_SHA384)
    } else if *hash == OID_NIST_HASH_SHA512 && salt == 64 {
        Some(&sig::RSA_PSS_2048_8192_SHA512)
    } else {
        None
    }
}

fn check_critical_extensions(cert: &X509Certificate<'_>) -> Result<(), EkCertError> {
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        if ext.critical && !HANDLED_CRITICAL_EXTENSIONS.contains(&oid.as_str()) {
            return Err(EkCertError::UnsupportedCriticalExtension {
                subject: describe(cert),
                oid,
            });
        }
    }
    Ok(())
}

fn to_datetime(secs: i64) -> DateTime<Utc> {
    // Out of chrono's range only for years beyond ±262143.
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn check_validity(cert: &X509Certificate<'_>, now: DateTime<Utc>) -> Result<(), EkCertError> {
    let validity = cert.validity();
    let now = now.timestamp();
    if now < validity.not_before.timestamp() {
        return Err(EkCertError::NotYetValid {
            subject: describe(cert),
            not_before: to_datetime(validity.not_before.timestamp()),
        });
    }
    if now > validity.not_after.timestamp() {
        return Err(EkCertError::Expired {
            subject: describe(cert),
            not_after: to_datetime(validity.not_after.timestamp()),
        });
    }
    Ok(())
}

/// An issuer must be a CA allowed to sign certificates, with room below it
/// for the `cas_below` CA certificates between it and the EK certificate.
fn check_ca(issuer: &X509Certificate<'_>, cas_below: usize) -> Result<(), EkCertError> {
    let malformed = |e: x509_parser::error::X509Error| EkCertError::Malformed {
        detail: format!("{}: {e}", describe(issuer)),
    };
    let not_ca = || EkCertError::NotCa {
        subject: describe(issuer),
    };
    let constraints = issuer
        .basic_constraints()
        .map_err(malformed)?
        .ok_or_else(not_ca)?;
    if !constraints.value.ca {
        return Err(not_ca());
    }
    if let Some(path_len) = constraints.value.path_len_constraint {
        if cas_below > path_len as usize {
            return Err(EkCertError::PathLenExceeded {
                subject: describe(issuer),
                path_len,
            });
        }
    }
    if let Some(usage) = issuer.key_usage().map_err(malformed)? {
        if !usage.value.key_cert_sign() {
            return Err(not_ca());
        }
    }
    Ok(())
}

/// The certificate's subject public key must be the EK: same RSA modulus
/// and exponent, or same curve and point.
fn check_key(cert: &X509Certificate<'_>, ek: &Public) -> Result<(), EkCertError> {
    let spki = cert.public_key();
    let parsed = spki.parsed().map_err(|e| EkCertError::Malformed {
        detail: format!("subject public key: {e}"),
    })?;
    let same = match (&parsed, &ek.key) {
        (
            SpkiKey::RSA(rsa),
            PublicKey::Rsa {
                modulus, exponent, ..
            },
        ) => {
            strip_zeros(rsa.modulus) == strip_zeros(modulus)
                && rsa.try_exponent().ok() == Some(u64::from(*exponent))
        }
        (SpkiKey::EC(point), PublicKey::Ecc { curve, x, y }) => {
            let cert_curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let (curve_oid, len) = match curve {
                EccCurve::NistP256 => (OID_EC_P256, 32),
                EccCurve::NistP384 => (OID_NIST_EC_P384, 48),
            };
            cert_curve.as_ref() == Some(&curve_oid)
                && match (pad(x, len), pad(y, len)) {
                    (Some(x), Some(y)) => point.data() == [&[0x04][..], &x, &y].concat(),
                    _ => false,
                }
        }
        (SpkiKey::RSA(_) | SpkiKey::EC(_), _) => false,
        (other, _) => {
            return Err(EkCertError::UnsupportedKey {
                detail: match other {
                    SpkiKey::DSA(_) => "DSA".into(),
                    SpkiKey::GostR3410(_) | SpkiKey::GostR3410_2012(_) => "GOST".into(),
                    _ => spki.algorithm.algorithm.to_id_string(),
                },
            })
        }
    };
    if same {
        Ok(())
    } else {
        Err(EkCertError::KeyMismatch)
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[start..]
}

fn pad(coord: &[u8], len: usize) -> Option<Vec<u8>> {
    let c = strip_zeros(coord);
    if c.len() > len {
        return None;
    }
    let mut out = vec![0u8; len - c.len()];
    out.extend_from_slice(c);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proto::tpm::{ak_public, KeyScheme};
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    };

    /// DER TLV with a definite length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n @ 0..=127 => out.push(n as u8),
            n @ 128..=255 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    /// subjectAltName with a directoryName of TPM manufacturer attributes,
    /// as in the TCG EK Credential Profile.
    fn tpm_san() -> CustomExtension {
        let attr = |last: u8, value: &str| {
            let oid = tlv(0x06, &[0x67, 0x81, 0x05, 0x02, last]);
            tlv(
                0x31,
                &tlv(0x30, &[oid, tlv(0x0c, value.as_bytes())].concat()),
            )
        };
        let name = tlv(
            0x30,
            &[
                attr(1, "id:00001014"),
                attr(2, "swtpm"),
                attr(3, "id:20191023"),
            ]
            .concat(),
        );
        let general_names = tlv(0x30, &tlv(0xa4, &name));
        let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 17], general_names);
        ext.set_criticality(true);
        ext
    }

    fn ca_params(cn: &str, constraint: IsCa) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = constraint;
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2040, 1, 1);
        p
    }

    fn ek_params() -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.custom_extensions = vec![tpm_san()];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![2, 23, 133, 8, 1])];
        p.key_usages = vec![KeyUsagePurpose::KeyAgreement];
        p.use_authority_key_identifier_extension = true;
        p.not_before = rcgen::date_time_ymd(2021, 1, 1);
        p.not_after = rcgen::date_time_ymd(2035, 1, 1);
        p
    }

    fn ecc_ek(key: &KeyPair) -> Public {
        let raw = key.public_key_raw();
        assert_eq!(raw.len(), 65);
        ak_public(
            PublicKey::Ecc {
                curve: EccCurve::NistP256,
                x: raw[1..33].to_vec(),
                y: raw[33..].to_vec(),
            },
            KeyScheme::Null,
        )
    }

    struct Chain {
        root: Vec<u8>,
        intermediate: Vec<u8>,
        ek_cert: Vec<u8>,
        ek: Public,
    }

    /// Root (P-384) -> intermediate (P-256) -> EK certificate (P-256 EK).
    fn chain_with(intermediate_ca: IsCa, root_ca: IsCa) -> Chain {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let root = ca_params("Test EK Root", root_ca)
            .self_signed(&root_key)
            .unwrap();
        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let intermediate = ca_params("Test EK Intermediate", intermediate_ca)
            .signed_by(&int_key, &root, &root_key)
            .unwrap();
        let ek_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ek_cert = ek_params()
            .signed_by(&ek_key, &intermediate, &int_key)
            .unwrap();
        Chain {
            root: root.der().to_vec(),
            intermediate: intermediate.der().to_vec(),
            ek_cert: ek_cert.der().to_vec(),
            ek: ecc_ek(&ek_key),
        }
    }

    fn chain() -> Chain {
        chain_with(
            IsCa::Ca(BasicConstraints::Unconstrained),
            IsCa::Ca(BasicConstraints::Unconstrained),
        )
    }

    fn at(year: i32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(year, 6, 1, 0, 0, 0).unwrap()
    }

    fn roots(c: &Chain) -> EkRoots {
        EkRoots::from_der([c.root.clone(), c.intermediate.clone()]).unwrap()
    }

    #[test]
    fn ecdsa_chain_with_tpm_extensions_is_accepted() {
        let c = chain();
        let roots = roots(&c);
        assert_eq!((roots.root_count(), roots.intermediate_count()), (1, 1));
        let info = verify_ek_certificate(&c.ek_cert, &c.ek, &roots, at(2030)).unwrap();
        assert_eq!(info.issuer, "CN=Test EK Intermediate");
        assert_eq!(info.subject, "");
        assert_eq!(info.root, "CN=Test EK Root");
        assert_eq!(
            info.not_after,
            Utc.with_ymd_and_hms(2035, 1, 1, 0, 0, 0).unwrap()
        );
        assert!(!info.serial.is_empty());
        // Zero padding from a larger NV index is tolerated, other bytes not.
        let mut padded = c.ek_cert.clone();
        padded.extend([0; 16]);
        assert!(verify_ek_certificate(&padded, &c.ek, &roots, at(2030)).is_ok());
        padded.push(1);
        assert!(matches!(
            verify_ek_certificate(&padded, &c.ek, &roots, at(2030)),
            Err(EkCertError::Malformed { .. })
        ));
    }

    #[test]
    fn errors_name_the_certificate() {
        let c = chain();
        let roots = roots(&c);
        // The EK certificate has an empty subject: named by its serial.
        match verify_ek_certificate(&c.ek_cert, &c.ek, &roots, at(2036)) {
            Err(EkCertError::Expired { subject, not_after }) => {
                assert!(subject.contains("empty subject"), "{subject}");
                assert_eq!(
                    not_after,
                    Utc.with_ymd_and_hms(2035, 1, 1, 0, 0, 0).unwrap()
                );
            }
            other => panic!("{other:?}"),
        }
        // At 2020-06 the EK certificate is not valid yet (2021).
        assert!(matches!(
            verify_ek_certificate(&c.ek_cert, &c.ek, &roots, at(2020)),
            Err(EkCertError::NotYetValid { .. })
        ));
    }

    #[test]
    fn issuer_that_is_not_a_ca_is_refused() {
        let c = chain_with(
            IsCa::ExplicitNoCa,
            IsCa::Ca(BasicConstraints::Unconstrained),
        );
        match verify_ek_certificate(&c.ek_cert, &c.ek, &roots(&c), at(2030)) {
            Err(EkCertError::NotCa { subject }) => assert_eq!(subject, "CN=Test EK Intermediate"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn path_length_constraint_is_enforced() {
        let c = chain_with(
            IsCa::Ca(BasicConstraints::Unconstrained),
            IsCa::Ca(BasicConstraints::Constrained(0)),
        );
        match verify_ek_certificate(&c.ek_cert, &c.ek, &roots(&c), at(2030)) {
            Err(EkCertError::PathLenExceeded { subject, path_len }) => {
                assert_eq!((subject.as_str(), path_len), ("CN=Test EK Root", 0));
            }
            other => panic!("{other:?}"),
        }
    }

    /// Root -> `intermediates` CA certificates -> EK certificate.
    fn long_chain(intermediates: usize) -> (EkRoots, Vec<u8>, Public) {
        let unconstrained = || IsCa::Ca(BasicConstraints::Unconstrained);
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let root = ca_params("Root", unconstrained())
            .self_signed(&root_key)
            .unwrap();
        let mut ders = vec![root.der().to_vec()];
        let (mut issuer, mut issuer_key) = (root, root_key);
        for depth in 0..intermediates {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = ca_params(&format!("Intermediate {depth}"), unconstrained())
                .signed_by(&key, &issuer, &issuer_key)
                .unwrap();
            ders.push(cert.der().to_vec());
            (issuer, issuer_key) = (cert, key);
        }
        let ek_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = ek_params()
            .signed_by(&ek_key, &issuer, &issuer_key)
            .unwrap();
        (
            EkRoots::from_der(ders).unwrap(),
            leaf.der().to_vec(),
            ecc_ek(&ek_key),
        )
    }

    #[test]
    fn chains_longer_than_the_limit_are_refused() {
        // MAX_CHAIN_DEPTH CA certificates, root included, are allowed.
        let (roots, leaf, ek) = long_chain(MAX_CHAIN_DEPTH - 1);
        let info = verify_ek_certificate(&leaf, &ek, &roots, at(2030)).unwrap();
        assert_eq!(info.root, "CN=Root");
        let (roots, leaf, ek) = long_chain(MAX_CHAIN_DEPTH);
        assert!(matches!(
            verify_ek_certificate(&leaf, &ek, &roots, at(2030)),
            Err(EkCertError::ChainTooLong {
                max: MAX_CHAIN_DEPTH
            })
        ));
    }

    #[test]
    fn unknown_critical_extension_is_refused() {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let root = ca_params("R", IsCa::Ca(BasicConstraints::Unconstrained))
            .self_signed(&root_key)
            .unwrap();
        let roots = EkRoots::from_der([root.der().to_vec()]).unwrap();
        let ek_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The TPM SAN is critical, and accepted.
        let plain = ek_params().signed_by(&ek_key, &root, &root_key).unwrap();
        assert!(verify_ek_certificate(plain.der(), &ecc_ek(&ek_key), &roots, at(2030)).is_ok());

        let mut params = ek_params();
        let mut odd = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
        odd.set_criticality(true);
        params.custom_extensions.push(odd);
        let leaf = params.signed_by(&ek_key, &root, &root_key).unwrap();
        match verify_ek_certificate(leaf.der(), &ecc_ek(&ek_key), &roots, at(2030)) {
            Err(EkCertError::UnsupportedCriticalExtension { oid, .. }) => {
                assert_eq!(oid, "1.3.6.1.4.1.99999.1")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_must_be_the_ek_sent() {
        let c = chain();
        let roots = roots(&c);
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(matches!(
            verify_ek_certificate(&c.ek_cert, &ecc_ek(&other), &roots, at(2030)),
            Err(EkCertError::KeyMismatch)
        ));
        let rsa = ak_public(
            PublicKey::Rsa {
                modulus: vec![0xc5; 256],
                exponent: 65537,
                key_bits: 2048,
            },
            KeyScheme::Null,
        );
        assert!(matches!(
            verify_ek_certificate(&c.ek_cert, &rsa, &roots, at(2030)),
            Err(EkCertError::KeyMismatch)
        ));
        // Same point, claimed on another curve.
        let PublicKey::Ecc { x, y, .. } = c.ek.key.clone() else {
            unreachable!()
        };
        let p384 = ak_public(
            PublicKey::Ecc {
                curve: EccCurve::NistP384,
                x,
                y,
            },
            KeyScheme::Null,
        );
        assert!(matches!(
            verify_ek_certificate(&c.ek_cert, &p384, &roots, at(2030)),
            Err(EkCertError::KeyMismatch)
        ));
    }

    #[test]
    fn roots_load_from_files_and_directories() {
        let c = chain();
        let dir = tempfile::tempdir().unwrap();
        let pem = |der: &[u8]| {
            let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
            format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
        };
        // A bundle (with a key block that is skipped), a DER file, a README.
        let bundle = format!(
            "{}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{}",
            pem(&c.root),
            pem(&c.root)
        );
        std::fs::write(dir.path().join("bundle.pem"), bundle).unwrap();
        std::fs::write(dir.path().join("intermediate.DER"), &c.intermediate).unwrap();
        std::fs::write(dir.path().join("README"), "not a certificate").unwrap();
        std::fs::write(
            dir.path().join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let roots = EkRoots::load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!((roots.root_count(), roots.intermediate_count()), (1, 1));
        assert!(verify_ek_certificate(&c.ek_cert, &c.ek, &roots, at(2030)).is_ok());

        // Named explicitly, a file without certificates is an error.
        assert!(matches!(
            EkRoots::load(&[dir.path().join("key.pem")]),
            Err(EkCertError::NoCertificates { .. })
        ));
        assert!(matches!(
            EkRoots::load(&[dir.path().join("README")]),
            Err(EkCertError::Malformed { .. })
        ));
        assert!(matches!(
            EkRoots::load(&[dir.path().join("missing.pem")]),
            Err(EkCertError::Io { .. })
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            EkRoots::load(&[empty.path().to_path_buf()]),
            Err(EkCertError::NoCertificates { .. })
        ));
        // No configured CA at all: a valid, strict configuration.
        let none = EkRoots::load(&[]).unwrap();
        assert_eq!((none.root_count(), none.intermediate_count()), (0, 0));
        // A self-signed certificate with a broken signature is corrupt.
        let mut broken = c.root.clone();
        let last = broken.len() - 1;
        broken[last] ^= 1;
        assert!(matches!(
            EkRoots::from_der([broken]),
            Err(EkCertError::Malformed { .. })
        ));
    }
}
