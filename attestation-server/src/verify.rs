//! The quote verifier: a pure function of (evidence, expected state, policy,
//! now) to a verdict. No I/O happens here; the HTTP handlers look up the
//! expected state, call [`verify`], and store what it returns.
//!
//! The steps run in this order, each with its own failure type:
//! 1. [`Step::Decode`]: base64/hex and TPM structure decoding
//! 2. [`Step::Signature`]: the quote is signed by the host's enrolled AK
//! 3. [`Step::Nonce`]: the nonce was issued by us, to this host, and is
//!    unexpired (that it is unused, the store checks as it stores the verdict)
//! 4. [`Step::PcrSelection`]: the quote covers exactly the PCRs we asked for
//! 5. [`Step::PcrDigest`]: the reported PCR values hash to the quote's pcrDigest
//! 6. [`Step::Clock`]: the TPM's clock and counters did not go back (replay,
//!    state rollback); higher reset or restart counts are a reboot
//! 7. [`Step::EventLog`]: the UEFI event log, when sent, decodes and
//!    replays to the quoted value of every PCR it extends
//! 8. [`Step::ImaLog`]: the IMA entries, when sent, decode and, replayed
//!    from the host's stored IMA state, reach the quoted PCR 10
//! 9. [`Step::Whitelist`]: the PCR values are among the acceptable ones, the
//!    UEFI log passes the boot policies, the new IMA entries the runtime
//!    policies
//! 10. the verdict: trusted only when every step passed.
//!
//! Steps 1–8 prove the evidence genuine and current; a failure there is an
//! error. Step 9 judges genuine evidence; a mismatch there is an `untrusted`
//! verdict.

use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use proto::bootpolicy::{BootFault, BootPolicy};
use proto::eventlog::{self, EventLog, EventLogError, ReplayMismatch};
use proto::ima::{self, ImaError, ImaState, Replayed};
use proto::policy::{
    AppliedPolicy, Group, MatchPolicy, Part, PartOutcome, PartResult, WhitelistRef,
    WhitelistVersion,
};
use proto::runtime_policy::RuntimePolicy;
use proto::tpm::{
    self, Attest, ClockInfo, EccCurve, HashAlg, KeyScheme, PcrSelection, Public, PublicKey,
    Signature,
};
use proto::wire::{self, Evidence, HostTrust, PcrFault, PcrValues, Reason, Trust};
use ring::signature as sig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// PCR 10: where IMA extends its measurements.
pub const IMA_PCR: u8 = 10;
/// The PCRs a UEFI log extends (firmware 0–7, grub 8–9, shim's MOK lists
/// 14): a challenge asks for them when a boot policy judges the host, since
/// a log event in a PCR the quote leaves out would be unauthenticated.
pub const UEFI_LOG_PCRS: [u8; 11] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14];
/// Runtime faults kept per runtime policy (the count goes on beyond it):
/// a reason names the first failing files, never the whole list.
pub const MAX_RUNTIME_FAULTS: usize = 5;

/// The named verification steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Decode,
    Signature,
    Nonce,
    PcrSelection,
    PcrDigest,
    Clock,
    EventLog,
    ImaLog,
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
            Step::EventLog => "eventlog",
            Step::ImaLog => "ima_log",
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

/// The UEFI event log does not decode, or does not replay to the quote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogFailure {
    #[error("uefi_log is not valid base64")]
    Encoding,
    #[error("UEFI event log: {0}")]
    Parse(EventLogError),
    #[error("UEFI event log altered: {mismatch}{}{}",
        altered.as_ref().map(|a| format!("; {a}")).unwrap_or_default(),
        refused.as_ref().map(|f| format!("; the host's boot policy refuses {f}")).unwrap_or_default())]
    Replay {
        mismatch: ReplayMismatch,
        /// The first event of the mismatching PCR that differs from the
        /// host's last verified log, when one is stored.
        altered: Option<Box<AlteredEvent>>,
        /// Without a stored log: the first event of the mismatching PCR
        /// that a boot policy judging the host refuses, if one does.
        refused: Option<Box<BootFault>>,
    },
}

/// An event that differs from the host's last verified UEFI log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {index} ({event_type}) is the first in PCR {pcr} that differs from the last verified log (digest {actual}, was {expected})")]
pub struct AlteredEvent {
    pub index: u32,
    pub pcr: u32,
    pub event_type: &'static str,
    pub expected: String,
    pub actual: String,
}

/// The IMA entries do not decode, or do not replay to the quoted PCR 10.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImaLogFailure {
    #[error("IMA list: {0}")]
    Parse(ImaError),
    #[error("IMA entries were sent but the quote does not cover PCR {IMA_PCR}")]
    PcrNotQuoted,
    #[error("IMA list altered: PCR {IMA_PCR} ({bank}) is quoted as {quoted}; entries {first}-{last} replayed from the stored state ({replayed_from}) never reach it (the whole list gives {replayed}){}",
        altered.as_ref().map(|a| format!("; {a}")).unwrap_or_default())]
    Replay {
        bank: HashAlg,
        quoted: String,
        replayed_from: String,
        replayed: String,
        /// 1-based positions in the whole list of the entries sent.
        first: u64,
        last: u64,
        /// The first entry sent whose data does not hash to its logged
        /// template hash, if one does not.
        altered: Option<Box<ima::AlteredEntry>>,
    },
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
    // Boxed: the log failures carry digests and would make every
    // `Result<_, Failure>` large.
    #[error("{0}")]
    EventLog(Box<EventLogFailure>),
    #[error("{0}")]
    ImaLog(Box<ImaLogFailure>),
}

impl From<EventLogFailure> for Failure {
    fn from(f: EventLogFailure) -> Self {
        Failure::EventLog(Box::new(f))
    }
}

impl From<ImaLogFailure> for Failure {
    fn from(f: ImaLogFailure) -> Self {
        Failure::ImaLog(Box::new(f))
    }
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
            Failure::EventLog(_) => Step::EventLog,
            Failure::ImaLog(_) => Step::ImaLog,
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
            Failure::Nonce(NonceFailure::Expired { .. }) => "nonce_expired",
            Failure::Nonce(NonceFailure::Replayed) => "nonce_replayed",
            Failure::PcrSelection(SelectionFailure::QuoteDiffers { .. }) => {
                "pcr_selection_mismatch"
            }
            Failure::PcrSelection(SelectionFailure::ValuesDiffer { .. }) => "pcr_values_incomplete",
            Failure::PcrDigest(_) => "pcr_digest_mismatch",
            Failure::Clock(_) => "clock_replay",
            Failure::EventLog(f) => match f.as_ref() {
                EventLogFailure::Encoding => "eventlog_encoding",
                EventLogFailure::Parse(e) => e.code(),
                EventLogFailure::Replay { mismatch, .. } => mismatch.code(),
            },
            Failure::ImaLog(f) => match f.as_ref() {
                ImaLogFailure::Parse(e) => e.code(),
                ImaLogFailure::PcrNotQuoted => "ima_pcr_not_quoted",
                ImaLogFailure::Replay { .. } => "ima_replay_mismatch",
            },
        }
    }

    pub fn reason(&self) -> Reason {
        Reason {
            step: self.step().name().into(),
            code: self.code().into(),
            message: self.to_string(),
            pcr: self.pcr_fault(),
        }
    }

    /// The PCR a log replay disagrees with: expected is what the log
    /// replays to, actual what the TPM quoted.
    fn pcr_fault(&self) -> Option<PcrFault> {
        let fault = |index: u32, bank: HashAlg, expected: String, actual: Option<String>| {
            u8::try_from(index).ok().map(|index| PcrFault {
                index,
                bank,
                expected: vec![expected],
                actual,
                part: None,
                whitelist: None,
            })
        };
        match self {
            Failure::EventLog(f) => match f.as_ref() {
                EventLogFailure::Replay {
                    mismatch:
                        ReplayMismatch::Differs {
                            bank,
                            pcr,
                            quoted,
                            replayed,
                            ..
                        },
                    ..
                } => fault(
                    *pcr,
                    *bank,
                    hex::encode(replayed),
                    Some(hex::encode(quoted)),
                ),
                EventLogFailure::Replay {
                    mismatch:
                        ReplayMismatch::NotQuoted {
                            bank,
                            pcr,
                            replayed,
                            ..
                        },
                    ..
                } => fault(*pcr, *bank, hex::encode(replayed), None),
                _ => None,
            },
            Failure::ImaLog(f) => match f.as_ref() {
                ImaLogFailure::Replay {
                    bank,
                    quoted,
                    replayed,
                    ..
                } => fault(
                    u32::from(IMA_PCR),
                    *bank,
                    replayed.clone(),
                    Some(quoted.clone()),
                ),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The challenge the evidence's nonce was issued with (see
/// `crate::challenge`), seen by the evidence it is used with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedChallenge {
    /// The PCRs it asked for; `None` when they are not what this server
    /// would ask for now (a policy change since the challenge): the quote
    /// is then judged by what it covers, against the policy as it is now.
    pub selection: Option<PcrSelection>,
    pub expires_at: DateTime<Utc>,
}

/// What the server expects of this host's evidence.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub host: &'a str,
    /// The host's enrolled AK.
    pub ak: &'a Public,
    /// The challenge the evidence's nonce was issued with; `None` when this
    /// pool did not issue it to this host.
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
    /// The parts of the (not deleted) whitelists that judge the host.
    fn parts(&self) -> impl Iterator<Item = &Part> + Clone {
        self.whitelists
            .iter()
            .filter(|w| !w.deleted)
            .flat_map(|w| w.parts.values())
    }

    /// The boot policies of the whitelists that judge the host.
    pub fn boot_policies(&self) -> impl Iterator<Item = &BootPolicy> + Clone {
        self.parts().filter_map(|p| p.boot.as_deref())
    }

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
                    Part::of_pcrs(wl.pcrs.clone()),
                )]),
                deleted: false,
                created_at: DateTime::<Utc>::UNIX_EPOCH,
                created_by: String::new(),
            }],
        }
    }
}

/// The outcome of the whitelist step: faults (empty: trusted) and what was applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub faults: Vec<Reason>,
    pub applied: AppliedPolicy,
    /// Every runtime policy judged, by [`runtime_fingerprint`], with its
    /// faults so far in this boot (to store in [`HostImaState::runtime`]).
    pub runtime: BTreeMap<String, RuntimeRecord>,
}

/// What a runtime policy found in a host's IMA list since its boot:
/// failures stick, since incremental verification never sends an entry twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeRecord {
    pub failures_total: u64,
    /// The first [`MAX_RUNTIME_FAULTS`] failures.
    pub faults: Vec<Reason>,
}

/// What the server keeps per host for incremental IMA verification
/// (`hosts.ima_state`, JSON): where the PCR 10 replay stands, and which
/// runtime policies judged every entry up to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostImaState {
    pub state: ImaState,
    /// The bank runtime policies verify file digests with.
    pub bank: HashAlg,
    /// Runtime policy fingerprint -> its findings over entries
    /// `1..=state.entries_verified`. A policy not listed has not seen all
    /// of them: the next challenge asks for the list from the start.
    #[serde(default)]
    pub runtime: BTreeMap<String, RuntimeRecord>,
}

impl HostImaState {
    /// The state is the one of the boot with TPM reset count `reset_count`.
    pub fn same_boot(&self, reset_count: u32) -> bool {
        self.state.reset_count == Some(reset_count)
    }
}

/// The event logs judged with the PCR values (see [`judge`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Logs<'a> {
    /// The UEFI log, checked against the quote.
    pub uefi: Option<&'a EventLog>,
    pub ima: Option<ImaLogs<'a>>,
}

/// IMA entries checked against the quote, and where they start.
#[derive(Debug, Clone, Copy)]
pub struct ImaLogs<'a> {
    /// The entries after the stored state covered by the quote (may be
    /// none), their template hashes checked.
    pub replayed: &'a Replayed,
    /// The runtime policies that judged every entry before `replayed.start`.
    pub verified: &'a BTreeMap<String, RuntimeRecord>,
    /// The host sent a continuation of a list this server no longer
    /// follows (it rebooted): nothing could be judged this time.
    pub restarted: bool,
}

/// What the log steps produced: the parsed logs for the whitelist step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckedLogs {
    /// The UEFI log bytes and its parse, replayed equal to the quote.
    pub uefi: Option<(Vec<u8>, EventLog)>,
    pub ima: Option<CheckedIma>,
}

/// IMA entries the quote covers, with the state before and after them.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedIma {
    pub replayed: Replayed,
    /// The bank runtime policies are judged in (kept with the state).
    pub bank: HashAlg,
    pub verified: BTreeMap<String, RuntimeRecord>,
    pub restarted: bool,
}

impl CheckedLogs {
    /// The logs of a host's last genuine evidence, as stored, to judge it
    /// again after a policy change: the UEFI log (checked against that
    /// quote when it was stored) and the IMA state with no new entries, so
    /// runtime policies give the findings kept in the state.
    pub fn stored(rec: &crate::store::HostRecord) -> Self {
        let uefi = rec
            .last_uefi_log
            .as_ref()
            .and_then(|b| eventlog::parse(b).ok().map(|l| (b.clone(), l)));
        let ima = rec.ima_state.as_ref().map(|s| CheckedIma {
            replayed: Replayed::unchanged(s.state.clone()),
            bank: s.bank,
            verified: s.runtime.clone(),
            restarted: false,
        });
        CheckedLogs { uefi, ima }
    }

    pub fn logs(&self) -> Logs<'_> {
        Logs {
            uefi: self.uefi.as_ref().map(|(_, l)| l),
            ima: self.ima.as_ref().map(|i| ImaLogs {
                replayed: &i.replayed,
                verified: &i.verified,
                restarted: i.restarted,
            }),
        }
    }
}

/// Genuine evidence and the verdict on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub attest: Attest,
    /// The TPM was reset or restarted since the last genuine quote.
    pub rebooted: bool,
    pub pcrs: PcrValues,
    pub verdict: HostTrust,
    /// The logs the evidence carried, checked against the quote.
    pub logs: CheckedLogs,
    /// The host's IMA state after this evidence (None: no IMA was sent).
    pub ima_state: Option<HostImaState>,
}

impl Verified {
    /// Judge the same genuine evidence again, against `policy` as it is now.
    pub fn rejudge(&mut self, policy: &HostPolicy) {
        let j = judge(&self.pcrs, &self.logs.logs(), policy);
        self.verdict = rejudged(&self.verdict, j.faults, j.applied);
        if let (Some(state), Some(ima)) = (&mut self.ima_state, &self.logs.ima) {
            state.runtime = merged_runtime(ima, j.runtime);
        }
    }
}

/// The runtime records to store: those judged now (a restart keeps none).
fn merged_runtime(
    ima: &CheckedIma,
    judged: BTreeMap<String, RuntimeRecord>,
) -> BTreeMap<String, RuntimeRecord> {
    if ima.restarted {
        BTreeMap::new()
    } else {
        judged
    }
}

/// Decoded evidence (step 1's output).
#[derive(Debug, Clone)]
pub struct Decoded {
    pub nonce: Vec<u8>,
    pub attest_bytes: Vec<u8>,
    pub attest: Attest,
    pub signature: Signature,
}

/// Run every step on one piece of evidence, for a host without IMA state.
pub fn verify(
    evidence: &Evidence,
    expected: &Expected<'_>,
    policy: &Policy<'_>,
    now: DateTime<Utc>,
) -> Result<Verified, Failure> {
    verify_with_state(evidence, expected, StoredLogs::default(), policy, now)
}

/// What the server stored of a host's earlier evidence's logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoredLogs<'a> {
    /// Where its last verified IMA entries left PCR 10.
    pub ima_state: Option<&'a HostImaState>,
    /// Its last verified UEFI log, to name the event an altered log changed.
    pub uefi_log: Option<&'a [u8]>,
}

/// Run every step on one piece of evidence, given what is stored of the
/// host's earlier logs.
pub fn verify_with_state(
    evidence: &Evidence,
    expected: &Expected<'_>,
    stored: StoredLogs<'_>,
    policy: &Policy<'_>,
    now: DateTime<Utc>,
) -> Result<Verified, Failure> {
    let ima_state = stored.ima_state;
    let decoded = decode(evidence)?;
    check_signature(&decoded, expected.ak)?;
    check_nonce(&decoded, expected, now)?;
    check_selection(&decoded.attest, &evidence.pcrs, expected.challenge)?;
    check_pcr_digest(&decoded, &evidence.pcrs)?;
    let rebooted = check_clock(&decoded.attest.clock_info, expected.last_clock.as_ref())?;
    let boot = policy.host_policy.boot_policies();
    let uefi = check_uefi_log(evidence, stored.uefi_log, boot)?;
    let ima = check_ima_log(evidence, ima_state, decoded.attest.clock_info.reset_count)?;
    let logs = CheckedLogs { uefi, ima };
    let judgement = judge(&evidence.pcrs, &logs.logs(), policy.host_policy);
    let mut verdict = verdict(expected.host, judgement.faults, now, policy.freshness);
    verdict.policy = Some(judgement.applied);
    let ima_state = logs.ima.as_ref().map(|i| HostImaState {
        state: i.replayed.end.clone(),
        bank: i.bank,
        runtime: merged_runtime(i, judgement.runtime),
    });
    Ok(Verified {
        rebooted,
        verdict,
        attest: decoded.attest,
        pcrs: evidence.pcrs.clone(),
        logs,
        ima_state,
    })
}

/// The quoted values of `bank`, as bytes by PCR index.
fn quoted_bank(pcrs: &PcrValues, bank: HashAlg) -> BTreeMap<u32, Vec<u8>> {
    pcrs.get(&bank)
        .map(|values| {
            values
                .iter()
                .filter_map(|(i, v)| Some((u32::from(*i), hex::decode(v).ok()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Step 7: the UEFI log replays, in every quoted bank it has, to the
/// quoted value of every PCR it extends. A mismatch names the event that
/// changed since `previous` (the host's last verified log), or else the
/// first event of that PCR one of `boot` (the boot policies judging the
/// host) refuses: the replay alone tells which PCR, not which event.
pub fn check_uefi_log<'p>(
    evidence: &Evidence,
    previous: Option<&[u8]>,
    boot: impl Iterator<Item = &'p BootPolicy> + Clone,
) -> Result<Option<(Vec<u8>, EventLog)>, EventLogFailure> {
    let Some(b64) = &evidence.uefi_log else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| EventLogFailure::Encoding)?;
    let log = eventlog::parse(&bytes).map_err(EventLogFailure::Parse)?;
    let log_banks = log.banks();
    let banks: Vec<HashAlg> = evidence
        .pcrs
        .iter()
        .filter(|(b, v)| !v.is_empty() && log_banks.contains(b))
        .map(|(b, _)| *b)
        .collect();
    if banks.is_empty() {
        // No quoted bank is in the log: nothing of it is bound to the TPM.
        let bank = evidence
            .pcrs
            .keys()
            .next()
            .copied()
            .unwrap_or(HashAlg::Sha256);
        return Err(EventLogFailure::Replay {
            mismatch: ReplayMismatch::BankNotInLog { bank },
            altered: None,
            refused: None,
        });
    }
    for bank in banks {
        eventlog::check_against_quote(&log, bank, &quoted_bank(&evidence.pcrs, bank)).map_err(
            |mismatch| {
                let altered = altered_event(&log, previous, bank, &mismatch).map(Box::new);
                let refused = match altered {
                    Some(_) => None,
                    None => refused_event(&log, boot.clone(), &mismatch).map(Box::new),
                };
                EventLogFailure::Replay {
                    mismatch,
                    altered,
                    refused,
                }
            },
        )?;
    }
    Ok(Some((bytes, log)))
}

/// The first event of the mismatching PCR that one of `boot` refuses.
fn refused_event<'p>(
    log: &EventLog,
    boot: impl Iterator<Item = &'p BootPolicy>,
    mismatch: &ReplayMismatch,
) -> Option<BootFault> {
    let ReplayMismatch::Differs { pcr, .. } = mismatch else {
        return None;
    };
    boot.flat_map(|b| b.evaluate(log))
        .filter(|f| f.pcr == Some(*pcr) && f.event_index.is_some())
        .min_by_key(|f| f.event_index)
}

/// The first event of the mismatching PCR whose digest differs from the
/// same position in the host's last verified log (which the quote then
/// matched), or that the old log did not have.
fn altered_event(
    log: &EventLog,
    previous: Option<&[u8]>,
    bank: HashAlg,
    mismatch: &ReplayMismatch,
) -> Option<AlteredEvent> {
    let ReplayMismatch::Differs { pcr, .. } = mismatch else {
        return None;
    };
    let old = eventlog::parse(previous?).ok()?;
    let in_pcr = |l: &'_ EventLog| -> Vec<(u32, u32, Vec<u8>)> {
        l.events
            .iter()
            .filter(|e| e.pcr == *pcr && e.event_type != eventlog::EV_NO_ACTION)
            .map(|e| {
                (
                    e.index,
                    e.event_type,
                    e.digest(bank).map(<[u8]>::to_vec).unwrap_or_default(),
                )
            })
            .collect()
    };
    let (new, old) = (in_pcr(log), in_pcr(&old));
    new.iter()
        .enumerate()
        .find(|(i, (_, _, d))| old.get(*i).is_none_or(|(_, _, o)| o != d))
        .map(|(i, (index, event_type, d))| AlteredEvent {
            index: *index,
            pcr: *pcr,
            event_type: eventlog::event_type_name(*event_type),
            expected: old
                .get(i)
                .map_or_else(|| "no such event".into(), |(_, _, o)| hex::encode(o)),
            actual: hex::encode(d),
        })
}

/// Step 8: the IMA entries, replayed from where the host's stored state
/// left PCR 10, reach the quoted PCR 10 in every quoted bank. The agent
/// reads the list after quoting, so it may hold entries the quote does not
/// cover yet: the shortest prefix that reaches the quote is taken, the rest
/// is sent again next time.
pub fn check_ima_log(
    evidence: &Evidence,
    stored: Option<&HostImaState>,
    reset_count: u32,
) -> Result<Option<CheckedIma>, ImaLogFailure> {
    let Some(sent) = &evidence.ima else {
        return Ok(None);
    };
    let banks: Vec<HashAlg> = evidence
        .pcrs
        .iter()
        .filter(|(_, v)| v.contains_key(&IMA_PCR))
        .map(|(b, _)| *b)
        .collect();
    // Runtime policies judge file digests in the policy's preferred bank:
    // sha256 when quoted, else the first quoted bank with PCR 10.
    let bank = banks
        .iter()
        .copied()
        .find(|b| *b == HashAlg::Sha256)
        .or_else(|| banks.first().copied())
        .ok_or(ImaLogFailure::PcrNotQuoted)?;
    let continued = stored.filter(|s| {
        sent.from > 0
            && s.same_boot(reset_count)
            && s.state.entries_verified == sent.from
            && banks.iter().all(|b| s.state.pcr10(*b).is_some())
    });
    let fresh = || ImaState::new(None, Some(reset_count), &banks);
    if sent.from > 0 && continued.is_none() {
        // A continuation of a list we do not follow (the host rebooted
        // since the challenge was made): start over at the next attestation.
        return Ok(Some(CheckedIma {
            replayed: Replayed::unchanged(fresh()),
            bank,
            verified: BTreeMap::new(),
            restarted: true,
        }));
    }
    let (start, verified) = match continued {
        Some(s) => (s.state.clone(), s.runtime.clone()),
        None => (fresh(), BTreeMap::new()),
    };
    let first_line = usize::try_from(sent.from)
        .ok()
        .and_then(|f| f.checked_add(1))
        .unwrap_or(usize::MAX);
    let quoted: Vec<(HashAlg, Vec<u8>)> = banks
        .iter()
        .map(|b| {
            let q = quoted_bank(&evidence.pcrs, *b)
                .remove(&u32::from(IMA_PCR))
                .unwrap_or_default();
            (*b, q)
        })
        .collect();
    let quoted: Vec<(HashAlg, &[u8])> = quoted.iter().map(|(b, q)| (*b, q.as_slice())).collect();
    // A long list (a first attestation) is parsed and hashed on every core.
    let replayed =
        ima::replay_ascii_to_quote(sent.entries.as_bytes(), first_line, &start, &quoted, 0)
            .map_err(|f| match f {
                ima::ReplayFailure::Parse(e) => ImaLogFailure::Parse(e),
                ima::ReplayFailure::Mismatch(m) => ImaLogFailure::Replay {
                    bank: m.bank,
                    quoted: hex::encode(&m.quoted),
                    replayed_from: hex::encode(&m.replayed_from),
                    replayed: hex::encode(&m.replayed),
                    first: sent.from.saturating_add(1),
                    last: sent.from.saturating_add(m.entries as u64),
                    altered: m.altered,
                },
            })?;
    Ok(Some(CheckedIma {
        replayed,
        bank,
        verified,
        restarted: false,
    }))
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
    if let Some(asked) = challenge.and_then(|ch| ch.selection.as_ref()) {
        let asked = asked.normalized();
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

/// Step 9: compare genuine PCR values and logs with the host's policy,
/// part by part.
///
/// A part passes when any of the host's whitelists that defines it matches:
/// every PCR the part lists is reported with one of its acceptable values
/// (PCRs no part names are not judged), the UEFI log passes its boot
/// policy and the IMA list its runtime policy. A part the group marks
/// `required` must be defined by one of its whitelists. A policy that
/// judges nothing is itself a fault: trust is never the default.
pub fn judge(pcrs: &PcrValues, logs: &Logs<'_>, policy: &HostPolicy) -> Judgement {
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
    let mut runtime = BTreeMap::new();
    for (name, candidates) in &parts {
        // The first candidate that passes wins; otherwise report the closest.
        // Every candidate is judged, so each runtime policy sees every entry
        // (incremental verification never sends an entry twice).
        let mut best: Option<(WhitelistRef, Vec<Reason>, usize)> = None;
        for (w, part) in candidates {
            let (mut part_faults, mut checked) = judge_part(pcrs, name, w, part);
            if let Some(boot) = &part.boot {
                checked += 1;
                part_faults.extend(judge_boot(logs.uefi, boot, name, w));
            }
            if let Some(policy) = &part.runtime {
                checked += 1;
                let (faults, record) = judge_runtime(logs.ima.as_ref(), policy, name, w);
                part_faults.extend(faults);
                if let Some((fp, record)) = record {
                    runtime.insert(fp, record);
                }
            }
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
    Judgement {
        faults,
        applied,
        runtime,
    }
}

fn whitelist_fault(code: &str, message: String) -> Reason {
    Reason {
        step: Step::Whitelist.name().into(),
        code: code.into(),
        message,
        pcr: None,
    }
}

/// A boot policy against the UEFI log: every fault names its event, PCR,
/// what was expected and what was found. No log is a fault (fail closed).
fn judge_boot(
    log: Option<&EventLog>,
    boot: &proto::bootpolicy::BootPolicy,
    part_name: &str,
    w: &WhitelistVersion,
) -> Vec<Reason> {
    let Some(log) = log else {
        return vec![whitelist_fault(
            "eventlog_missing",
            format!(
                "part {part_name} of whitelist {}@{} has a boot policy but the host sent no UEFI event log",
                w.name, w.version
            ),
        )];
    };
    boot.evaluate(log)
        .into_iter()
        .map(|f| {
            let pcr = f.pcr.and_then(|p| u8::try_from(p).ok());
            Reason {
                step: Step::Whitelist.name().into(),
                code: f.code.as_str().into(),
                message: format!(
                    "{f} (boot policy of part {part_name}, whitelist {}@{})",
                    w.name, w.version
                ),
                pcr: pcr.map(|index| PcrFault {
                    index,
                    bank: boot.bank,
                    expected: vec![f.expected.clone()],
                    actual: Some(f.actual.clone()),
                    part: Some(part_name.to_string()),
                    whitelist: Some(format!("{}@{}", w.name, w.version)),
                }),
            }
        })
        .collect()
}

/// The name a runtime policy's findings are kept under (see
/// [`RuntimePolicy::fingerprint`]).
pub fn runtime_fingerprint(policy: &RuntimePolicy) -> String {
    policy.fingerprint().to_string()
}

/// A runtime policy against the new IMA entries, on top of what it found
/// earlier in this boot. Returns the part's faults and the record to keep.
fn judge_runtime(
    ima: Option<&ImaLogs<'_>>,
    policy: &RuntimePolicy,
    part_name: &str,
    w: &WhitelistVersion,
) -> (Vec<Reason>, Option<(String, RuntimeRecord)>) {
    let wref = format!("{}@{}", w.name, w.version);
    let Some(ima) = ima else {
        return (
            vec![whitelist_fault(
                "ima_missing",
                format!("part {part_name} of whitelist {wref} has a runtime policy but the host sent no IMA list"),
            )],
            None,
        );
    };
    if ima.restarted {
        return (
            vec![whitelist_fault(
                "ima_list_restarted",
                "the host rebooted since its IMA list was last verified; the whole list is verified at the next attestation".into(),
            )],
            None,
        );
    }
    let fp = runtime_fingerprint(policy);
    let previous = ima.verified.get(&fp);
    if previous.is_none() && ima.replayed.start.entries_verified > 0 {
        return (
            vec![whitelist_fault(
                "ima_policy_not_applied",
                format!(
                    "the runtime policy of part {part_name} (whitelist {wref}) is new: IMA entries 1-{} were judged by another; the whole list is judged against it at the next attestation",
                    ima.replayed.start.entries_verified
                ),
            )],
            None,
        );
    }
    let mut record = previous.cloned().unwrap_or_default();
    match ima::judge_replayed(ima.replayed, policy, 0) {
        Ok(outcome) => {
            record.failures_total = record.failures_total.saturating_add(outcome.failures_total);
            let room = MAX_RUNTIME_FAULTS.saturating_sub(record.faults.len());
            record
                .faults
                .extend(outcome.failures.iter().take(room).map(|f| Reason {
                    step: Step::Whitelist.name().into(),
                    code: runtime_code(f.code).into(),
                    message: format!(
                        "IMA entry {} (line {}): {} {}; expected {}, found {} (runtime policy of part {part_name}, whitelist {wref})",
                        f.index,
                        f.line,
                        f.path,
                        runtime_what(f.code),
                        if f.expected.is_empty() { "no entry for this path".to_string() } else { f.expected.join(" or ") },
                        f.actual.as_deref().unwrap_or("nothing"),
                    ),
                    pcr: None,
                }));
        }
        Err(e) => {
            // Validated when stored; a policy this build cannot compile fails closed.
            record.failures_total = record.failures_total.saturating_add(1);
            if record.faults.len() < MAX_RUNTIME_FAULTS {
                record.faults.push(whitelist_fault(
                    "runtime_policy_invalid",
                    format!("runtime policy of part {part_name} (whitelist {wref}): {e}"),
                ));
            }
        }
    }
    let mut faults = record.faults.clone();
    let shown = faults.len() as u64;
    if record.failures_total > shown {
        faults.push(whitelist_fault(
            "ima_more_failures",
            format!(
                "{} more IMA entries fail the runtime policy of part {part_name} (whitelist {wref}); {} in all since boot",
                record.failures_total - shown,
                record.failures_total
            ),
        ));
    }
    (faults, Some((fp, record)))
}

fn runtime_code(code: ima::FailureCode) -> &'static str {
    match code {
        ima::FailureCode::TemplateHashMismatch => "ima_template_hash_mismatch",
        ima::FailureCode::NotInPolicy => "ima_not_in_policy",
        ima::FailureCode::DigestMismatch => "ima_digest_mismatch",
        ima::FailureCode::Violation => "ima_violation",
        ima::FailureCode::SignatureInvalid => "ima_signature_invalid",
        ima::FailureCode::UnexpectedPcr => "ima_unexpected_pcr",
    }
}

fn runtime_what(code: ima::FailureCode) -> &'static str {
    match code {
        ima::FailureCode::TemplateHashMismatch => "does not hash to its logged template hash",
        ima::FailureCode::NotInPolicy => "is not in the runtime policy",
        ima::FailureCode::DigestMismatch => "has a digest the runtime policy does not allow",
        ima::FailureCode::Violation => "is a measurement violation (open for write while measured)",
        ima::FailureCode::SignatureInvalid => "has a signature no policy key verifies",
        ima::FailureCode::UnexpectedPcr => "was measured into a PCR other than 10",
    }
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

/// Trusted only when no fault was found.
fn trust_of(faults: &[Reason]) -> Trust {
    if faults.is_empty() {
        Trust::Trusted
    } else {
        Trust::Untrusted
    }
}

/// The verdict on the same evidence judged anew (a policy changed): its
/// time and expiry stay, trust, reasons and policy are the new judgement's.
pub fn rejudged(base: &HostTrust, faults: Vec<Reason>, applied: AppliedPolicy) -> HostTrust {
    HostTrust {
        trust: trust_of(&faults),
        reasons: faults,
        policy: Some(applied),
        ..base.clone()
    }
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
        trust: trust_of(&faults),
        verified_at: Some(verified_at),
        expires_at: Some(verified_at + freshness),
        reasons: faults,
        policy: None,
    }
}

/// What a host's policy needs of its event logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogNeeds {
    /// Banks of the boot policies (empty: no UEFI log needed).
    pub boot_banks: BTreeSet<HashAlg>,
    /// Fingerprints of the runtime policies (empty: no IMA needed).
    pub runtime: BTreeSet<String>,
}

impl LogNeeds {
    pub fn of(policy: &HostPolicy) -> Self {
        let mut needs = LogNeeds::default();
        for part in policy.parts() {
            if let Some(boot) = &part.boot {
                needs.boot_banks.insert(boot.bank);
            }
            if let Some(policy) = &part.runtime {
                needs.runtime.insert(runtime_fingerprint(policy));
            }
        }
        needs
    }

    pub fn uefi_log(&self) -> bool {
        !self.boot_banks.is_empty()
    }

    /// `base` plus the PCRs the logs need: those a UEFI log extends in every
    /// boot policy's bank, PCR 10 in every bank when IMA is judged.
    pub fn selection(&self, base: &wire::PcrSelectionMap) -> wire::PcrSelectionMap {
        let mut sel: BTreeMap<HashAlg, BTreeSet<u8>> = base
            .iter()
            .map(|(b, p)| (*b, p.iter().copied().collect()))
            .collect();
        for bank in &self.boot_banks {
            sel.entry(*bank).or_default().extend(UEFI_LOG_PCRS);
        }
        if !self.runtime.is_empty() {
            if sel.is_empty() {
                sel.entry(HashAlg::Sha256).or_default();
            }
            for pcrs in sel.values_mut() {
                pcrs.insert(IMA_PCR);
            }
        }
        sel.into_iter()
            .map(|(b, p)| (b, p.into_iter().collect()))
            .collect()
    }

    /// The first IMA entry to ask for (None: no IMA): where the stored state
    /// stands if it belongs to the current boot (`reset_count` of the last
    /// quote) and every runtime policy judged all entries before it, else 0.
    pub fn ima_from(&self, stored: Option<&HostImaState>, reset_count: Option<u32>) -> Option<u64> {
        if self.runtime.is_empty() {
            return None;
        }
        let from = stored
            .filter(|s| reset_count.is_some_and(|r| s.same_boot(r)))
            .filter(|s| self.runtime.iter().all(|fp| s.runtime.contains_key(fp)))
            .map_or(0, |s| s.state.entries_verified);
        Some(from)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proto::ima::{ImaEntry, Template};

    fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(format!("{}/../fixtures/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn evidence(pcrs: PcrValues) -> Evidence {
        Evidence {
            nonce: String::new(),
            attest: String::new(),
            signature: String::new(),
            pcrs,
            uefi_log: None,
            ima: None,
        }
    }

    fn entry(path: &str) -> ImaEntry {
        let d = HashAlg::Sha256.hash(&[path.as_bytes()]);
        ima::make_entry(Template::ImaNg, HashAlg::Sha256, &d, path, &[]).unwrap()
    }

    fn pcr10(entries: &[ImaEntry]) -> PcrValues {
        let v = hex::encode(ima::replay(entries, HashAlg::Sha256));
        BTreeMap::from([(HashAlg::Sha256, BTreeMap::from([(IMA_PCR, v)]))])
    }

    fn ima_evidence(all: &[ImaEntry], quoted: &[ImaEntry], from: u64) -> Evidence {
        let mut ev = evidence(pcr10(quoted));
        let text = ima::encode_ascii(all);
        let lines: String = text
            .lines()
            .skip(from as usize)
            .map(|l| format!("{l}\n"))
            .collect();
        ev.ima = Some(wire::ImaEvidence {
            from,
            entries: lines,
        });
        ev
    }

    fn policy_of(parts: Vec<(&str, Part)>) -> HostPolicy {
        HostPolicy {
            group: None,
            whitelists: vec![WhitelistVersion {
                name: "fleet".into(),
                version: 1,
                description: None,
                parts: parts.into_iter().map(|(n, p)| (n.to_string(), p)).collect(),
                deleted: false,
                created_at: DateTime::<Utc>::UNIX_EPOCH,
                created_by: String::new(),
            }],
        }
    }

    fn runtime_part(allowed: &[&str]) -> Part {
        let digests = allowed
            .iter()
            .map(|p| {
                let d = hex::encode(HashAlg::Sha256.hash(&[p.as_bytes()]));
                (p.to_string(), vec![format!("sha256:{d}")])
            })
            .collect();
        Part {
            runtime: Some(
                proto::runtime_policy::PolicyDocument {
                    digests,
                    ..Default::default()
                }
                .into(),
            ),
            ..Part::default()
        }
    }

    #[test]
    fn ima_takes_the_prefix_the_quote_covers() {
        let all: Vec<ImaEntry> = ["/a", "/b", "/c"].iter().map(|p| entry(p)).collect();
        // The quote was made after two entries; the third came before the read.
        let ev = ima_evidence(&all, &all[..2], 0);
        let got = check_ima_log(&ev, None, 7).unwrap().unwrap();
        assert_eq!(got.replayed.len(), 2);
        assert_eq!(got.replayed.end.entries_verified, 2);
        assert_eq!(got.replayed.end.reset_count, Some(7));
        assert_eq!(
            got.replayed.end.pcr10(HashAlg::Sha256).unwrap(),
            ima::replay(&all[..2], HashAlg::Sha256)
        );
        // Continue from the stored state: only the third entry is sent.
        let stored = HostImaState {
            state: got.replayed.end.clone(),
            bank: HashAlg::Sha256,
            runtime: BTreeMap::new(),
        };
        let next = ima_evidence(&all, &all, 2);
        let got = check_ima_log(&next, Some(&stored), 7).unwrap().unwrap();
        assert_eq!(got.replayed.len(), 1);
        assert_eq!(got.replayed.entry(0).unwrap().name(), "/c");
        assert_eq!(got.replayed.end.entries_verified, 3);
        assert!(!got.restarted);
        // The same continuation after a reboot cannot be followed.
        let got = check_ima_log(&next, Some(&stored), 8).unwrap().unwrap();
        assert!(got.restarted && got.replayed.is_empty());
        assert_eq!(got.replayed.end.entries_verified, 0);
        // A list whose entries never reach the quote was altered.
        let forged = vec![entry("/a"), entry("/x")];
        let mut ev = ima_evidence(&forged, &forged, 0);
        ev.pcrs = pcr10(&all[..2]);
        let e = Failure::from(check_ima_log(&ev, None, 7).unwrap_err());
        assert_eq!(e.code(), "ima_replay_mismatch");
        assert_eq!(e.reason().pcr.map(|p| p.index), Some(IMA_PCR));
        assert!(e.to_string().contains("entries 1-2"), "{e}");
        assert!(!e.to_string().contains("logged template hash"), "{e}");
        // An entry edited in place (its logged template hash left) is named.
        let mut ev = ima_evidence(&all[..2], &all[..2], 0);
        if let Some(sent) = ev.ima.as_mut() {
            sent.entries = sent.entries.replace(" /b\n", " /y\n");
        }
        let e = Failure::from(check_ima_log(&ev, None, 7).unwrap_err());
        assert_eq!(e.code(), "ima_replay_mismatch");
        assert!(
            e.to_string()
                .contains("; entry 2 (line 2, /y) is not what its logged template hash says"),
            "{e}"
        );
        // No PCR 10 in the quote.
        let mut ev = ima_evidence(&all, &all, 0);
        ev.pcrs = BTreeMap::new();
        let e = Failure::from(check_ima_log(&ev, None, 7).unwrap_err());
        assert_eq!(e.code(), "ima_pcr_not_quoted");
        // Malformed lines name their line in the whole list.
        let mut ev = ima_evidence(&all, &all, 2);
        ev.ima.as_mut().unwrap().entries = "10 zz ima-ng\n".into();
        let e = Failure::from(check_ima_log(&ev, Some(&stored), 7).unwrap_err());
        assert_eq!(e.code(), "ima_malformed_line");
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn runtime_failures_stick_and_changed_policies_start_over() {
        let all: Vec<ImaEntry> = ["/a", "/b", "/rogue"].iter().map(|p| entry(p)).collect();
        let policy = policy_of(vec![("runtime", runtime_part(&["/a", "/b"]))]);
        let needs = LogNeeds::of(&policy);
        assert!(!needs.uefi_log());
        assert_eq!(needs.ima_from(None, Some(1)), Some(0));

        let ev = ima_evidence(&all, &all, 0);
        let checked = CheckedLogs {
            uefi: None,
            ima: check_ima_log(&ev, None, 1).unwrap(),
        };
        let j = judge(&ev.pcrs, &checked.logs(), &policy);
        assert_eq!(j.faults.len(), 1, "{:?}", j.faults);
        assert_eq!(j.faults[0].code, "ima_not_in_policy");
        assert!(j.faults[0].message.contains("/rogue"));
        assert!(j.faults[0].message.contains("IMA entry 3 (line 3)"));
        let stored = HostImaState {
            state: checked.ima.as_ref().unwrap().replayed.end.clone(),
            bank: HashAlg::Sha256,
            runtime: j.runtime.clone(),
        };
        // The next challenge continues after entry 3.
        assert_eq!(needs.ima_from(Some(&stored), Some(1)), Some(3));
        assert_eq!(needs.ima_from(Some(&stored), Some(2)), Some(0), "reboot");
        // Nothing new: the failure stays.
        let ev = ima_evidence(&all, &all, 3);
        let checked = CheckedLogs {
            uefi: None,
            ima: check_ima_log(&ev, Some(&stored), 1).unwrap(),
        };
        assert_eq!(checked.ima.as_ref().unwrap().replayed.len(), 0);
        let j = judge(&ev.pcrs, &checked.logs(), &policy);
        assert_eq!(j.faults[0].code, "ima_not_in_policy");
        // A changed policy has not seen entries 1-3: not trusted, and the
        // next challenge asks for the whole list.
        let fixed = policy_of(vec![("runtime", runtime_part(&["/a", "/b", "/rogue"]))]);
        let j = judge(&ev.pcrs, &checked.logs(), &fixed);
        assert_eq!(j.faults[0].code, "ima_policy_not_applied");
        assert_eq!(
            LogNeeds::of(&fixed).ima_from(Some(&stored), Some(1)),
            Some(0)
        );
        let ev = ima_evidence(&all, &all, 0);
        let checked = CheckedLogs {
            uefi: None,
            ima: check_ima_log(&ev, Some(&stored), 1).unwrap(),
        };
        let j = judge(&ev.pcrs, &checked.logs(), &fixed);
        assert!(j.faults.is_empty(), "{:?}", j.faults);
        // No IMA sent at all: fail closed.
        let j = judge(&ev.pcrs, &Logs::default(), &fixed);
        assert_eq!(j.faults[0].code, "ima_missing");
    }

    #[test]
    fn many_runtime_failures_are_summarized() {
        let all: Vec<ImaEntry> = (0..12).map(|i| entry(&format!("/bad/{i}"))).collect();
        let policy = policy_of(vec![("runtime", runtime_part(&[]))]);
        let ev = ima_evidence(&all, &all, 0);
        let checked = CheckedLogs {
            uefi: None,
            ima: check_ima_log(&ev, None, 1).unwrap(),
        };
        let j = judge(&ev.pcrs, &checked.logs(), &policy);
        assert_eq!(j.faults.len(), MAX_RUNTIME_FAULTS + 1);
        let last = j.faults.last().unwrap();
        assert_eq!(last.code, "ima_more_failures");
        assert!(last.message.starts_with("7 more"), "{}", last.message);
    }

    #[test]
    fn uefi_log_replay_names_the_altered_event() {
        let bytes = fixture("eventlog/create-mb-policy-secureboot.bin");
        let log = eventlog::parse(&bytes).unwrap();
        let replay = &log.replay()[&HashAlg::Sha256];
        let mut pcrs: BTreeMap<u8, String> = replay
            .iter()
            .map(|(i, v)| (u8::try_from(*i).unwrap(), hex::encode(v)))
            .collect();
        pcrs.insert(IMA_PCR, hex::encode([0u8; 32]));
        let mut ev = evidence(BTreeMap::from([(HashAlg::Sha256, pcrs)]));
        let b64 = base64::engine::general_purpose::STANDARD;
        ev.uefi_log = Some(b64.encode(&bytes));
        let (kept, parsed) = check_uefi_log(&ev, None, std::iter::empty())
            .unwrap()
            .unwrap();
        assert_eq!(
            (kept.as_slice(), parsed.events.len()),
            (bytes.as_slice(), log.events.len())
        );

        let app = log
            .events
            .iter()
            .find(|e| e.event_type == eventlog::EV_EFI_BOOT_SERVICES_APPLICATION)
            .unwrap();
        let digest = app.digest(HashAlg::Sha256).unwrap();
        let at = app.offset
            + bytes[app.offset..app.data_offset]
                .windows(32)
                .position(|w| w == digest)
                .unwrap();
        let mut altered = bytes.clone();
        altered[at] ^= 0x80;
        ev.uefi_log = Some(b64.encode(&altered));
        let e = Failure::from(check_uefi_log(&ev, Some(&bytes), std::iter::empty()).unwrap_err());
        assert_eq!(
            (e.step(), e.code()),
            (Step::EventLog, "eventlog_replay_mismatch")
        );
        let fault = e.reason().pcr.unwrap();
        assert_eq!((fault.index, fault.bank), (4, HashAlg::Sha256));
        assert_eq!(fault.actual, Some(hex::encode(&replay[&4])));
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "event {} (EV_EFI_BOOT_SERVICES_APPLICATION)",
                app.index
            )),
            "{text}"
        );
        // Without the previous log, the PCR and its last event are named.
        let e = Failure::from(check_uefi_log(&ev, None, std::iter::empty()).unwrap_err());
        assert!(e.to_string().contains("last event into it"), "{e}");
        assert!(!e.to_string().contains("differs from"), "{e}");
        // Nor with a boot policy that allows it all; one made from the good
        // log names the event whose digest it does not allow.
        let open = proto::bootpolicy::BootPolicy {
            version: 1,
            ..serde_json::from_str(r#"{"version": 1, "bank": "sha256"}"#).unwrap()
        };
        let e = Failure::from(check_uefi_log(&ev, None, [&open].into_iter()).unwrap_err());
        assert!(!e.to_string().contains("refuses"), "{e}");
        let good = proto::bootpolicy::BootPolicy::from_eventlog(&log);
        let e = Failure::from(check_uefi_log(&ev, None, [&open, &good].into_iter()).unwrap_err());
        let text = e.to_string();
        assert!(
            text.contains("boot policy refuses")
                && text.contains(&format!("at event {} (PCR 4)", app.index)),
            "{text}"
        );
        assert_eq!(e.code(), "eventlog_replay_mismatch");
        // Garbage and a PCR the quote leaves out.
        ev.uefi_log = Some("%%%".into());
        assert_eq!(
            Failure::from(check_uefi_log(&ev, None, std::iter::empty()).unwrap_err()).code(),
            "eventlog_encoding"
        );
        ev.uefi_log = Some(b64.encode(&bytes[..100]));
        assert_eq!(
            Failure::from(check_uefi_log(&ev, None, std::iter::empty()).unwrap_err()).code(),
            "eventlog_truncated"
        );
        ev.uefi_log = Some(b64.encode(&bytes));
        ev.pcrs.get_mut(&HashAlg::Sha256).unwrap().remove(&14);
        assert_eq!(
            Failure::from(check_uefi_log(&ev, None, std::iter::empty()).unwrap_err()).code(),
            "eventlog_pcr_not_quoted"
        );
    }

    #[test]
    fn boot_parts_need_the_log_and_the_pcrs_it_extends() {
        let bytes = fixture("eventlog/create-mb-policy-secureboot.bin");
        let log = eventlog::parse(&bytes).unwrap();
        let boot = proto::bootpolicy::BootPolicy::from_eventlog(&log);
        let policy = policy_of(vec![(
            "platform",
            Part {
                boot: Some(Box::new(boot)),
                ..Part::default()
            },
        )]);
        let needs = LogNeeds::of(&policy);
        assert!(needs.uefi_log());
        assert_eq!(needs.ima_from(None, None), None);
        let base = BTreeMap::from([(HashAlg::Sha256, vec![0, 1, 2])]);
        assert_eq!(
            needs.selection(&base)[&HashAlg::Sha256],
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14]
        );
        let j = judge(&PcrValues::new(), &Logs::default(), &policy);
        assert_eq!(j.faults[0].code, "eventlog_missing");
        let logs = Logs {
            uefi: Some(&log),
            ima: None,
        };
        let j = judge(&PcrValues::new(), &logs, &policy);
        assert!(j.faults.is_empty(), "{:?}", j.faults);
        assert_eq!(j.applied.parts[0].pcrs_checked, 1);
        // A runtime part adds PCR 10 to every bank.
        let both = policy_of(vec![("runtime", runtime_part(&[]))]);
        let sel = LogNeeds::of(&both).selection(&base);
        assert_eq!(sel[&HashAlg::Sha256], vec![0, 1, 2, 10]);
    }
}
