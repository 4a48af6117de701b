//! The quote verifier: a pure function of (evidence, expected state, policy,
//! now) to a verdict. No I/O happens here; the HTTP handlers look up the
//! expected state, call [`verify`], and store what it returns.
//!
//! The steps run in this order, each with its own failure type:
//! 1. [`Step::Decode`]: base64/hex and TPM structure decoding
//! 2. [`Step::Signature`]: the quote is signed by the host's enrolled AK
//! 3. [`Step::Nonce`]: the nonce was issued by us, to this host, is unexpired and unused
//! 4. [`Step::PcrSelection`]: the quote covers exactly the PCRs we asked for
//! 5. [`Step::PcrDigest`]: the reported PCR values hash to the quote's pcrDigest
//! 6. [`Step::Clock`]: the TPM's clock and counters did not go back (replay,
//!    state rollback); higher reset or restart counts are a reboot
//! 7. [`Step::Whitelist`]: the PCR values are among the acceptable ones
//! 8. the verdict: trusted only when every step passed.
//!
//! Steps 1–6 prove the evidence genuine and current; a failure there is an
//! error. Step 7 judges genuine evidence; a mismatch there is an `untrusted`
//! verdict.

use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use proto::policy::{
    AppliedPolicy, Group, MatchPolicy, Part, PartOutcome, PartResult, WhitelistRef,
    WhitelistVersion,
};
use proto::tpm::{
    self, Attest, ClockInfo, EccCurve, HashAlg, KeyScheme, PcrSelection, Public, PublicKey,
    Signature,
};
use proto::wire::{self, Evidence, HostTrust, PcrFault, PcrValues, Reason, Trust};
use ring::signature as sig;
use std::collections::BTreeSet;

/// The named verification steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Decode,
    Signature,
    Nonce,
    PcrSelection,
    PcrDigest,
    Clock,
    Whitelist,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Decode => "decode",
            Step::Signature => "signature",
            Step::Nonce => "nonce",
            Step::PcrSelection => "pcr_selection",
            Step::PcrDigest => "pcr_digest",
            Step::Clock => "clock",
            Step::Whitelist => "whitelist",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeFailure {
    #[error("field {field} is not valid {encoding}")]
    Encoding {
        field: &'static str,
        encoding: &'static str,
    },
    #[error("attest is not a TPMS_ATTEST quote: {0}")]
    Attest(tpm::TpmError),
    #[error("signature is not a TPMT_SIGNATURE: {0}")]
    Signature(tpm::TpmError),
    #[error("PCR {index} of bank {bank} is {len} bytes, expected {expected}")]
    PcrLength {
        bank: HashAlg,
        index: u8,
        len: usize,
        expected: usize,
    },
    #[error("PCR index {index} is beyond {max}", max = tpm::MAX_PCR)]
    PcrIndex { index: u8 },
    #[error("the enrolled AK cannot be decoded: {0}")]
    Ak(tpm::TpmError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFailure {
    #[error("signature scheme {scheme} with {hash} does not fit the AK")]
    SchemeMismatch { scheme: &'static str, hash: HashAlg },
    #[error("signatures over {0} are not accepted")]
    WeakHash(HashAlg),
    #[error("the signature does not verify with the host's AK")]
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceFailure {
    #[error("the quote's qualifying data is not the nonce sent")]
    NotQuoted,
    #[error("nonce was not issued by this service")]
    Unknown,
    #[error("nonce was issued to host {issued_to}")]
    OtherHost { issued_to: String },
    #[error("nonce expired at {expired_at}")]
    Expired { expired_at: DateTime<Utc> },
    #[error("nonce was already used")]
    Replayed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionFailure {
    #[error("quote covers {quoted}, the challenge asked for {asked}")]
    QuoteDiffers { asked: String, quoted: String },
    #[error("reported PCR values cover {reported}, the quote covers {quoted}")]
    ValuesDiffer { reported: String, quoted: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestFailure {
    #[error("pcrDigest {quoted} does not match the reported PCR values (digest {computed})")]
    Mismatch { quoted: String, computed: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockFailure {
    #[error("TPM reset count went back from {last} to {quoted}")]
    ResetCountBackwards { last: u32, quoted: u32 },
    #[error("TPM restart count went back from {last} to {quoted} without a reset")]
    RestartCountBackwards { last: u32, quoted: u32 },
    #[error("TPM clock went back from {last} ms to {quoted} ms without a reboot")]
    ClockBackwards { last: u64, quoted: u64 },
}

/// Why evidence was refused: the step and its typed failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Decode(#[from] DecodeFailure),
    #[error("{0}")]
    Signature(#[from] SignatureFailure),
    #[error("{0}")]
    Nonce(#[from] NonceFailure),
    #[error("{0}")]
    PcrSelection(#[from] SelectionFailure),
    #[error("{0}")]
    PcrDigest(#[from] DigestFailure),
    #[error("{0}")]
    Clock(#[from] ClockFailure),
}

impl Failure {
    pub fn step(&self) -> Step {
        match self {
            Failure::Decode(_) => Step::Decode,
            Failure::Signature(_) => Step::Signature,
            Failure::Nonce(_) => Step::Nonce,
            Failure::PcrSelection(_) => Step::PcrSelection,
            Failure::PcrDigest(_) => Step::PcrDigest,
            Failure::Clock(_) => Step::Clock,
        }
    }

    /// Stable machine-readable code, used as the API error code and the
    /// CADF reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Failure::Decode(DecodeFailure::Encoding { .. }) => "evidence_encoding",
            Failure::Decode(DecodeFailure::Attest(_)) => "attest_malformed",
            Failure::Decode(DecodeFailure::Signature(_)) => "signature_malformed",
            Failure::Decode(DecodeFailure::PcrLength { .. } | DecodeFailure::PcrIndex { .. }) => {
                "pcr_value_malformed"
            }
            Failure::Decode(DecodeFailure::Ak(_)) => "ak_malformed",
            Failure::Signature(SignatureFailure::SchemeMismatch { .. }) => {
                "signature_scheme_mismatch"
            }
            Failure::Signature(SignatureFailure::WeakHash(_)) => "signature_weak_hash",
            Failure::Signature(SignatureFailure::Invalid) => "signature_invalid",
            Failure::Nonce(NonceFailure::NotQuoted) => "nonce_not_quoted",
            Failure::Nonce(NonceFailure::Unknown) => "nonce_unknown",
            Failure::Nonce(NonceFailure::OtherHost { .. }) => "nonce_other_host",
            Failure::Nonce(NonceFailure::Expired { .. }) => "nonce_expired",
            Failure::Nonce(NonceFailure::Replayed) => "nonce_replayed",
            Failure::PcrSelection(SelectionFailure::QuoteDiffers { .. }) => {
                "pcr_selection_mismatch"
            }
            Failure::PcrSelection(SelectionFailure::ValuesDiffer { .. }) => "pcr_values_incomplete",
            Failure::PcrDigest(_) => "pcr_digest_mismatch",
            Failure::Clock(_) => "clock_replay",
        }
    }

    pub fn reason(&self) -> Reason {
        Reason {
            step: self.step().name().into(),
            code: self.code().into(),
            message: self.to_string(),
            pcr: None,
        }
    }
}

/// A challenge as the store knows it, seen by the evidence it is used with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedChallenge {
    pub host: String,
    pub selection: PcrSelection,
    pub expires_at: DateTime<Utc>,
    /// True when an earlier evidence already consumed this nonce.
    pub used_before: bool,
}

/// What the server expects of this host's evidence.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub host: &'a str,
    /// The host's enrolled AK.
    pub ak: &'a Public,
    /// The challenge stored under the evidence's nonce, if any.
    pub challenge: Option<&'a IssuedChallenge>,
    /// The clock of the host's last genuine quote with this AK.
    pub last_clock: Option<ClockInfo>,
}

/// How to judge genuine evidence.
#[derive(Debug, Clone)]
pub struct Policy<'a> {
    pub host_policy: &'a HostPolicy,
    pub freshness: Duration,
}

/// What judges one host: its group (with the match policy per part) and
/// the newest version of every whitelist that applies to it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostPolicy {
    pub group: Option<Group>,
    pub whitelists: Vec<WhitelistVersion>,
}

impl HostPolicy {
    /// A policy of one whitelist holding `wl` as the host's own values
    /// (part `host_unique`), as `PUT /v1/hosts/{host}/whitelist` stores it.
    pub fn own(host: &str, wl: &wire::Whitelist) -> Self {
        HostPolicy {
            group: None,
            whitelists: vec![WhitelistVersion {
                name: format!("host:{host}"),
                version: 1,
                description: None,
                parts: std::collections::BTreeMap::from([(
                    proto::policy::PART_HOST_UNIQUE.to_string(),
                    Part {
                        pcrs: wl.pcrs.clone(),
                    },
                )]),
                deleted: false,
                created_at: DateTime::<Utc>::UNIX_EPOCH,
                created_by: String::new(),
            }],
        }
    }
}

/// The outcome of step 7: faults (empty: trusted) and what was applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub faults: Vec<Reason>,
    pub applied: AppliedPolicy,
}

/// Genuine evidence and the verdict on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub attest: Attest,
    /// The TPM was reset or restarted since the last genuine quote.
    pub rebooted: bool,
    pub pcrs: PcrValues,
    pub verdict: HostTrust,
}

/// Decoded evidence (step 1's output).
#[derive(Debug, Clone)]
pub struct Decoded {
    pub nonce: Vec<u8>,
    pub attest_bytes: Vec<u8>,
    pub attest: Attest,
    pub signature: Signature,
}

/// Run every step on one piece of evidence.
pub fn verify(
    evidence: &Evidence,
    expected: &Expected<'_>,
    policy: &Policy<'_>,
    now: DateTime<Utc>,
) -> Result<Verified, Failure> {
    let decoded = decode(evidence)?;
    check_signature(&decoded, expected.ak)?;
    check_nonce(&decoded, expected, now)?;
    check_selection(&decoded.attest, &evidence.pcrs, expected.challenge)?;
    check_pcr_digest(&decoded, &evidence.pcrs)?;
    let rebooted = check_clock(&decoded.attest.clock_info, expected.last_clock.as_ref())?;
    let judgement = judge(&evidence.pcrs, policy.host_policy);
    let mut verdict = verdict(expected.host, judgement.faults, now, policy.freshness);
    verdict.policy = Some(judgement.applied);
    Ok(Verified {
        rebooted,
        verdict,
        attest: decoded.attest,
        pcrs: evidence.pcrs.clone(),
    })
}

/// Step 1.
pub fn decode(evidence: &Evidence) -> Result<Decoded, DecodeFailure> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let nonce = hex::decode(&evidence.nonce).map_err(|_| DecodeFailure::Encoding {
        field: "nonce",
        encoding: "hex",
    })?;
    let attest_bytes = b64
        .decode(&evidence.attest)
        .map_err(|_| DecodeFailure::Encoding {
            field: "attest",
            encoding: "base64",
        })?;
    let sig_bytes = b64
        .decode(&evidence.signature)
        .map_err(|_| DecodeFailure::Encoding {
            field: "signature",
            encoding: "base64",
        })?;
    let attest = Attest::decode(&attest_bytes).map_err(DecodeFailure::Attest)?;
    let signature = Signature::decode(&sig_bytes).map_err(DecodeFailure::Signature)?;
    for (bank, values) in &evidence.pcrs {
        for (index, value) in values {
            if *index > tpm::MAX_PCR {
                return Err(DecodeFailure::PcrIndex { index: *index });
            }
            let bytes = hex::decode(value).map_err(|_| DecodeFailure::Encoding {
                field: "pcrs",
                encoding: "hex",
            })?;
            if bytes.len() != bank.digest_len() {
                return Err(DecodeFailure::PcrLength {
                    bank: *bank,
                    index: *index,
                    len: bytes.len(),
                    expected: bank.digest_len(),
                });
            }
        }
    }
    Ok(Decoded {
        nonce,
        attest_bytes,
        attest,
        signature,
    })
}

/// Step 2: the host's AK signed the quote. (The quote's qualifiedSigner is
/// the AK's *qualified* name, which depends on its parent EK; the signature
/// itself is what binds the quote to the AK.)
pub fn check_signature(d: &Decoded, ak: &Public) -> Result<(), SignatureFailure> {
    verify_signature(ak, &d.signature, &d.attest_bytes)
}

/// The bare signature check over `message`, also used as the benchmark floor.
pub fn verify_signature(
    ak: &Public,
    signature: &Signature,
    message: &[u8],
) -> Result<(), SignatureFailure> {
    let hash = signature.hash();
    let mismatch = || SignatureFailure::SchemeMismatch {
        scheme: signature.scheme_name(),
        hash,
    };
    if hash == HashAlg::Sha1 {
        return Err(SignatureFailure::WeakHash(hash));
    }
    // A key fixed to one scheme must be used with exactly that scheme.
    let scheme_ok = match (ak.scheme, signature) {
        (KeyScheme::Null, _) => true,
        (KeyScheme::RsaSsa(h), Signature::RsaSsa { .. }) => h == hash,
        (KeyScheme::RsaPss(h), Signature::RsaPss { .. }) => h == hash,
        (KeyScheme::Ecdsa(h), Signature::Ecdsa { .. }) => h == hash,
        _ => false,
    };
    if !scheme_ok {
        return Err(mismatch());
    }
    match (&ak.key, signature) {
        (
            PublicKey::Rsa {
                modulus, exponent, ..
            },
            Signature::RsaSsa { sig: s, .. } | Signature::RsaPss { sig: s, .. },
        ) => {
            let pss = matches!(signature, Signature::RsaPss { .. });
            let params: &sig::RsaParameters = match (pss, hash) {
                (false, HashAlg::Sha256) => &sig::RSA_PKCS1_2048_8192_SHA256,
                (false, HashAlg::Sha384) => &sig::RSA_PKCS1_2048_8192_SHA384,
                (false, HashAlg::Sha512) => &sig::RSA_PKCS1_2048_8192_SHA512,
                (true, HashAlg::Sha256) => &sig::RSA_PSS_2048_8192_SHA256,
                (true, HashAlg::Sha384) => &sig::RSA_PSS_2048_8192_SHA384,
                (true, HashAlg::Sha512) => &sig::RSA_PSS_2048_8192_SHA512,
                _ => return Err(mismatch()),
            };
            // ring wants both integers without leading zero bytes.
            let e = exponent.to_be_bytes();
            let key = sig::RsaPublicKeyComponents {
                n: strip_zeros(modulus),
                e: strip_zeros(&e),
            };
            key.verify(params, message, s)
                .map_err(|_| SignatureFailure::Invalid)
        }
        (PublicKey::Ecc { curve, x, y }, Signature::Ecdsa { r, s, .. }) => {
            let (alg, width): (&sig::EcdsaVerificationAlgorithm, usize) = match (curve, hash) {
                (EccCurve::NistP256, HashAlg::Sha256) => (&sig::ECDSA_P256_SHA256_FIXED, 32),
                (EccCurve::NistP384, HashAlg::Sha384) => (&sig::ECDSA_P384_SHA384_FIXED, 48),
                _ => return Err(mismatch()),
            };
            let point = [&[0x04u8][..], &left_pad(x, width)?, &left_pad(y, width)?].concat();
            let fixed = [left_pad(r, width)?, left_pad(s, width)?].concat();
            sig::UnparsedPublicKey::new(alg, point)
                .verify(message, &fixed)
                .map_err(|_| SignatureFailure::Invalid)
        }
        _ => Err(mismatch()),
    }
}

fn strip_zeros(v: &[u8]) -> &[u8] {
    let first = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    &v[first..]
}

/// TPMs may drop leading zero bytes of ECC coordinates and signature halves.
fn left_pad(v: &[u8], width: usize) -> Result<Vec<u8>, SignatureFailure> {
    if v.len() > width {
        return Err(SignatureFailure::Invalid);
    }
    let mut out = vec![0u8; width - v.len()];
    out.extend_from_slice(v);
    Ok(out)
}

/// Step 3.
pub fn check_nonce(
    d: &Decoded,
    expected: &Expected<'_>,
    now: DateTime<Utc>,
) -> Result<(), NonceFailure> {
    if d.attest.extra_data != d.nonce {
        return Err(NonceFailure::NotQuoted);
    }
    let ch = expected.challenge.ok_or(NonceFailure::Unknown)?;
    if ch.host != expected.host {
        return Err(NonceFailure::OtherHost {
            issued_to: ch.host.clone(),
        });
    }
    if ch.used_before {
        return Err(NonceFailure::Replayed);
    }
    if now >= ch.expires_at {
        return Err(NonceFailure::Expired {
            expired_at: ch.expires_at,
        });
    }
    Ok(())
}

fn describe(sel: &[(HashAlg, BTreeSet<u8>)]) -> String {
    if sel.is_empty() {
        return "no PCRs".into();
    }
    sel.iter()
        .map(|(a, p)| {
            format!(
                "{a}:{}",
                p.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Step 4: the quote's selection is the one asked for, and the reported
/// values are exactly the quoted PCRs.
pub fn check_selection(
    attest: &Attest,
    pcrs: &PcrValues,
    challenge: Option<&IssuedChallenge>,
) -> Result<(), SelectionFailure> {
    let quoted = attest.quote.pcr_select.normalized();
    if let Some(ch) = challenge {
        let asked = ch.selection.normalized();
        if quoted != asked {
            return Err(SelectionFailure::QuoteDiffers {
                asked: describe(&asked),
                quoted: describe(&quoted),
            });
        }
    }
    let reported: Vec<(HashAlg, BTreeSet<u8>)> = pcrs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(a, v)| (*a, v.keys().copied().collect()))
        .collect();
    if reported != quoted {
        return Err(SelectionFailure::ValuesDiffer {
            reported: describe(&reported),
            quoted: describe(&quoted),
        });
    }
    Ok(())
}

/// Step 5: hash the reported values in the quote's selection order.
pub fn check_pcr_digest(d: &Decoded, pcrs: &PcrValues) -> Result<(), DigestFailure> {
    let mut values: Vec<Vec<u8>> = Vec::new();
    for (bank, indices) in &d.attest.quote.pcr_select.banks {
        for index in indices {
            // Presence and encoding were checked by steps 1 and 4.
            let v = pcrs
                .get(bank)
                .and_then(|b| b.get(index))
                .and_then(|h| hex::decode(h).ok())
                .unwrap_or_default();
            values.push(v);
        }
    }
    let computed = tpm::pcr_digest(d.signature.hash(), values.iter().map(Vec::as_slice));
    if computed != d.attest.quote.pcr_digest {
        return Err(DigestFailure::Mismatch {
            quoted: hex::encode(&d.attest.quote.pcr_digest),
            computed: hex::encode(computed),
        });
    }
    Ok(())
}

/// Step 6: TPM time only moves forward. A higher reset count (TPM reset,
/// a reboot) or restart count (resume) starts a new clock epoch; within an
/// epoch the clock must not go back. Returns whether a reboot happened.
pub fn check_clock(quoted: &ClockInfo, last: Option<&ClockInfo>) -> Result<bool, ClockFailure> {
    let Some(last) = last else { return Ok(false) };
    if quoted.reset_count < last.reset_count {
        return Err(ClockFailure::ResetCountBackwards {
            last: last.reset_count,
            quoted: quoted.reset_count,
        });
    }
    if quoted.reset_count > last.reset_count {
        return Ok(true);
    }
    if quoted.restart_count < last.restart_count {
        return Err(ClockFailure::RestartCountBackwards {
            last: last.restart_count,
            quoted: quoted.restart_count,
        });
    }
    if quoted.restart_count > last.restart_count {
        return Ok(true);
    }
    if quoted.clock < last.clock {
        return Err(ClockFailure::ClockBackwards {
            last: last.clock,
            quoted: quoted.clock,
        });
    }
    Ok(false)
}

/// Step 7: compare genuine PCR values with the host's policy, part by part.
///
/// A part passes when any of the host's whitelists that defines it matches:
/// every PCR the part lists is reported with one of its acceptable values
/// (PCRs no part names are not judged). A part the group marks `required`
/// must be defined by one of its whitelists. A policy that judges nothing
/// is itself a fault: trust is never the default.
pub fn judge(pcrs: &PcrValues, policy: &HostPolicy) -> Judgement {
    let mut applied = AppliedPolicy {
        group: policy.group.as_ref().map(|g| g.name.clone()),
        whitelists: policy
            .whitelists
            .iter()
            .map(|w| WhitelistRef {
                name: w.name.clone(),
                version: w.version,
            })
            .collect(),
        parts: Vec::new(),
    };
    // part name -> the whitelists that define it, in name order.
    let mut parts: std::collections::BTreeMap<&str, Vec<(&WhitelistVersion, &Part)>> =
        Default::default();
    for w in policy.whitelists.iter().filter(|w| !w.deleted) {
        for (name, part) in &w.parts {
            parts.entry(name).or_default().push((w, part));
        }
    }
    let mut faults = Vec::new();
    if let Some(group) = &policy.group {
        for (part, rule) in &group.match_policy {
            if *rule == MatchPolicy::Required && !parts.contains_key(part.as_str()) {
                faults.push(Reason {
                    step: Step::Whitelist.name().into(),
                    code: "part_missing".into(),
                    message: format!(
                        "group {} requires part {part}, which none of its whitelists defines",
                        group.name
                    ),
                    pcr: None,
                });
                applied.parts.push(PartResult {
                    part: part.clone(),
                    outcome: PartOutcome::Missing,
                    whitelist: None,
                    pcrs_checked: 0,
                });
            }
        }
    }
    let mut judged = 0usize;
    for (name, candidates) in &parts {
        // The first candidate that passes wins; otherwise report the closest.
        let mut best: Option<(WhitelistRef, Vec<Reason>, usize)> = None;
        for (w, part) in candidates {
            let (part_faults, checked) = judge_part(pcrs, name, w, part);
            let better = best
                .as_ref()
                .is_none_or(|(_, f, _)| part_faults.len() < f.len());
            if better {
                best = Some((
                    WhitelistRef {
                        name: w.name.clone(),
                        version: w.version,
                    },
                    part_faults,
                    checked,
                ));
            }
            if best.as_ref().is_some_and(|(_, f, _)| f.is_empty()) {
                break;
            }
        }
        let Some((wref, part_faults, checked)) = best else {
            continue;
        };
        judged += checked;
        applied.parts.push(PartResult {
            part: name.to_string(),
            outcome: if part_faults.is_empty() {
                PartOutcome::Pass
            } else {
                PartOutcome::Fail
            },
            whitelist: Some(wref),
            pcrs_checked: checked,
        });
        faults.extend(part_faults);
    }
    if judged == 0 && faults.is_empty() {
        faults.push(Reason {
            step: Step::Whitelist.name().into(),
            code: "no_whitelist".into(),
            message: match &policy.group {
                Some(g) => format!("the whitelists of group {} list no PCR value", g.name),
                None => "no whitelist applies to this host".into(),
            },
            pcr: None,
        });
    }
    Judgement { faults, applied }
}

/// One part of one whitelist: its faults and how many PCRs it judged.
fn judge_part(
    pcrs: &PcrValues,
    part_name: &str,
    w: &WhitelistVersion,
    part: &Part,
) -> (Vec<Reason>, usize) {
    let mut faults = Vec::new();
    let mut checked = 0;
    for (bank, indices) in &part.pcrs {
        for (index, acceptable) in indices {
            checked += 1;
            let actual = pcrs.get(bank).and_then(|b| b.get(index));
            let ok = actual.is_some_and(|a| acceptable.iter().any(|v| v.eq_ignore_ascii_case(a)));
            if ok {
                continue;
            }
            let (code, message) = match actual {
                Some(a) => (
                    "pcr_not_whitelisted",
                    format!(
                        "PCR {index} ({bank}) is {a}, not an acceptable value of part {part_name} in whitelist {}@{}",
                        w.name, w.version
                    ),
                ),
                None => (
                    "pcr_not_reported",
                    format!(
                        "PCR {index} ({bank}) is in part {part_name} of whitelist {}@{} but was not quoted",
                        w.name, w.version
                    ),
                ),
            };
            faults.push(Reason {
                step: Step::Whitelist.name().into(),
                code: code.into(),
                message,
                pcr: Some(PcrFault {
                    index: *index,
                    bank: *bank,
                    expected: acceptable.clone(),
                    actual: actual.map(|a| a.to_ascii_lowercase()),
                    part: Some(part_name.to_string()),
                    whitelist: Some(format!("{}@{}", w.name, w.version)),
                }),
            });
        }
    }
    (faults, checked)
}

/// Step 8: trusted only when no fault was found.
pub fn verdict(
    host: &str,
    faults: Vec<Reason>,
    verified_at: DateTime<Utc>,
    freshness: Duration,
) -> HostTrust {
    HostTrust {
        host: host.to_string(),
        trust: if faults.is_empty() {
            Trust::Trusted
        } else {
            Trust::Untrusted
        },
        verified_at: Some(verified_at),
        expires_at: Some(verified_at + freshness),
        reasons: faults,
        policy: None,
    }
}

/// The selection a challenge asks for, in TPM form.
pub fn challenge_selection(map: &wire::PcrSelectionMap) -> PcrSelection {
    wire::selection_from_map(map)
}
