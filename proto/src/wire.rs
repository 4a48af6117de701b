//! JSON bodies of the HTTP API (documented with examples in `docs/api.md`).
//!
//! Requests refuse unknown fields, so a typo in a client is an error and not
//! a silently ignored setting.

use crate::tpm::{HashAlg, PcrSelection, MAX_PCR};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// PCR indices per bank, e.g. `{"sha256": [0, 1, 2]}`.
pub type PcrSelectionMap = BTreeMap<HashAlg, Vec<u8>>;
/// PCR values per bank and index, as hex, e.g. `{"sha256": {"0": "00…"}}`.
pub type PcrValues = BTreeMap<HashAlg, BTreeMap<u8, String>>;
/// Acceptable PCR values per bank and index: any listed value passes.
pub type PcrWhitelist = BTreeMap<HashAlg, BTreeMap<u8, Vec<String>>>;

/// Convert the JSON selection into the TPM structure (banks in name order).
pub fn selection_from_map(map: &PcrSelectionMap) -> PcrSelection {
    PcrSelection {
        banks: map
            .iter()
            .map(|(alg, pcrs)| {
                (
                    *alg,
                    pcrs.iter()
                        .copied()
                        .filter(|p| *p <= MAX_PCR)
                        .collect::<BTreeSet<u8>>(),
                )
            })
            .collect(),
    }
}

/// Convert a TPM selection into its JSON form.
pub fn selection_to_map(sel: &PcrSelection) -> PcrSelectionMap {
    sel.banks
        .iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(alg, pcrs)| (*alg, pcrs.iter().copied().collect()))
        .collect()
}

/// `POST /v1/agents/{host}/enroll`: prove the TPM's identity and register
/// the attestation key made under its endorsement key (docs/protocol.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// base64 of the EK certificate (DER) from the TPM's NV index; absent
    /// when the TPM has none (accepted only for hosts the operator named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_certificate: Option<String>,
    /// base64 of the EK's marshalled TPM2B_PUBLIC.
    pub ek_public: String,
    /// base64 of the AK's marshalled TPM2B_PUBLIC (`tpm2_createak -u`).
    pub ak_public: String,
    /// hex of the AK's name as the TPM reports it (`tpm2_createak -n`);
    /// when given it must be the name-algorithm digest of `ak_public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ak_name: Option<String>,
}

/// The credential the agent must activate with its TPM to finish enrolling.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollResponse {
    pub enrollment_id: String,
    /// base64 of the marshalled TPM2B_ID_OBJECT (TPM2_MakeCredential's credentialBlob).
    pub credential_blob: String,
    /// base64 of the marshalled TPM2B_ENCRYPTED_SECRET.
    pub encrypted_secret: String,
    pub expires_at: DateTime<Utc>,
}

/// `POST /v1/agents/{host}/activate`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    pub enrollment_id: String,
    /// hex of HMAC-SHA256 keyed by the recovered secret over the host name (UTF-8).
    pub proof: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActivateResponse {
    pub host: String,
    /// hex of the now active AK's TPM name.
    pub ak_name: String,
}

/// `POST /v1/agents/{host}/challenge` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Challenge {
    /// hex, at least 16 bytes; must come back as the quote's qualifying data.
    pub nonce: String,
    pub pcr_selection: PcrSelectionMap,
    pub expires_at: DateTime<Utc>,
    /// Send the UEFI event log (a whitelist part of the host has a boot policy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uefi_log: bool,
    /// Send the IMA entries from this index (0-based) on; absent: no IMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ima_from: Option<u64>,
}

/// `POST /v1/agents/{host}/evidence` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// The challenge's nonce, hex.
    pub nonce: String,
    /// base64 of the marshalled TPMS_ATTEST (`tpm2_quote -m`).
    pub attest: String,
    /// base64 of the marshalled TPMT_SIGNATURE (`tpm2_quote -s`).
    pub signature: String,
    /// The quoted PCR values.
    pub pcrs: PcrValues,
    /// base64 of the binary UEFI event log, when the challenge asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uefi_log: Option<String>,
    /// IMA entries, when the challenge asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ima: Option<ImaEvidence>,
}

/// The IMA measurement list from entry `from` (0-based) on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImaEvidence {
    /// Index of the first entry sent: the challenge's `ima_from`.
    pub from: u64,
    /// The ascii list lines (`ascii_runtime_measurements`) from `from` on.
    pub entries: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    Trusted,
    Untrusted,
    Unknown,
}

impl Trust {
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::Trusted => "trusted",
            Trust::Untrusted => "untrusted",
            Trust::Unknown => "unknown",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "trusted" => Some(Trust::Trusted),
            "untrusted" => Some(Trust::Untrusted),
            "unknown" => Some(Trust::Unknown),
            _ => None,
        }
    }
}

/// Why a verdict is what it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// The verification step that decided (`decode`, `signature`, `nonce`,
    /// `pcr_selection`, `pcr_digest`, `clock`, `whitelist`, `freshness`).
    pub step: String,
    /// Stable machine-readable code, e.g. `pcr_not_whitelisted`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr: Option<PcrFault>,
}

/// A PCR whose value is not among the acceptable ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PcrFault {
    pub index: u8,
    pub bank: HashAlg,
    pub expected: Vec<String>,
    pub actual: Option<String>,
    /// The whitelist part that lists this PCR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// The whitelist version the values come from, e.g. `fleet@3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitelist: Option<String>,
}

/// A host's trust verdict: the answer of `/evidence`, `/trust` and `/trust/query`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostTrust {
    pub host: String,
    pub trust: Trust,
    pub verified_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub reasons: Vec<Reason>,
    /// The group and whitelist versions the evidence was judged against,
    /// part by part (absent when evidence never reached the whitelist step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::AppliedPolicy>,
}

impl HostTrust {
    pub fn unknown(host: &str, reason: Reason) -> Self {
        Self {
            host: host.to_string(),
            trust: Trust::Unknown,
            verified_at: None,
            expires_at: None,
            reasons: vec![reason],
            policy: None,
        }
    }
}

/// `POST /v1/trust/query`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustQuery {
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustQueryResponse {
    pub hosts: Vec<HostTrust>,
}

/// `PUT /v1/hosts/{host}/whitelist` body and `GET` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Whitelist {
    pub pcrs: PcrWhitelist,
}

/// `GET /v1/hosts/{host}`: everything the server knows about one host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostDetail {
    pub host: String,
    pub registered_at: DateTime<Utc>,
    pub ak_name: Option<String>,
    /// The host's group, whose whitelists judge it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The host's own whitelist (`PUT /v1/hosts/{host}/whitelist`), all parts merged.
    pub whitelist: Option<Whitelist>,
    /// The PCR values of the last evidence that passed the integrity steps.
    pub last_pcrs: Option<PcrValues>,
    pub verdict: HostTrust,
}

/// `POST /v1/hosts` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterHost {
    pub host: String,
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Host names as they appear in certificates and URLs: DNS-label characters
/// only, so a name can never smuggle a path or a SQL fragment.
pub fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.starts_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_refuses_unknown_fields() {
        let ok = r#"{"nonce":"00","attest":"","signature":"","pcrs":{"sha256":{"0":"00"}}}"#;
        let ev: Evidence = serde_json::from_str(ok).unwrap();
        assert_eq!(ev.pcrs[&HashAlg::Sha256][&0], "00");
        let extra = r#"{"nonce":"00","attest":"","signature":"","pcrs":{},"trusted":true}"#;
        assert!(serde_json::from_str::<Evidence>(extra).is_err());
        let bad_bank = r#"{"nonce":"00","attest":"","signature":"","pcrs":{"md5":{}}}"#;
        assert!(serde_json::from_str::<Evidence>(bad_bank).is_err());
        // The logs are optional, and absent ones are not serialized.
        assert!(ev.uefi_log.is_none() && ev.ima.is_none());
        assert!(!serde_json::to_string(&ev).unwrap().contains("ima"));
        let logs = r#"{"nonce":"00","attest":"","signature":"","pcrs":{},"uefi_log":"AA==","ima":{"from":3,"entries":"10 x"}}"#;
        let ev: Evidence = serde_json::from_str(logs).unwrap();
        assert_eq!(ev.ima.as_ref().map(|i| i.from), Some(3));
        let bad_ima = r#"{"nonce":"00","attest":"","signature":"","pcrs":{},"ima":{"from":0,"entries":"","x":1}}"#;
        assert!(serde_json::from_str::<Evidence>(bad_ima).is_err());
    }

    #[test]
    fn challenge_log_requests_default_to_none() {
        let c = r#"{"nonce":"00","pcr_selection":{},"expires_at":"2026-01-01T00:00:00Z"}"#;
        let ch: Challenge = serde_json::from_str(c).unwrap();
        assert!(!ch.uefi_log && ch.ima_from.is_none());
        let json = serde_json::to_string(&ch).unwrap();
        assert!(
            !json.contains("uefi_log") && !json.contains("ima_from"),
            "{json}"
        );
    }

    #[test]
    fn host_names_are_restricted() {
        assert!(valid_host_name("node-1.example.org"));
        assert!(!valid_host_name(""));
        assert!(!valid_host_name("../etc"));
        assert!(!valid_host_name("a b"));
        assert!(!valid_host_name("x'; drop"));
    }
}
