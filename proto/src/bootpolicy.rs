//! Boot reference policy: what a host's UEFI event log must contain, event by
//! event (firmware blobs, boot applications, files grub loaded, the kernel
//! command line, the Secure Boot state and the PK/KEK/db/dbx contents),
//! rather than only what its PCRs hash to.
//!
//! `evaluate` trusts the events as given: the caller first checks the log
//! against a verified quote (`eventlog::check_against_quote`) so that every
//! event read here is bound to the TPM. Where the policy reads event data
//! (variables, grub strings) it also checks that the data hashes to the
//! event's digest, since only the digest is bound by the quote.

use crate::eventlog::{
    self, Event, EventLog, EFI_CERT_SHA256, EFI_CERT_X509, EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE, EV_EFI_BOOT_SERVICES_APPLICATION, EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_EFI_PLATFORM_FIRMWARE_BLOB2, EV_EFI_VARIABLE_DRIVER_CONFIG, EV_IPL,
};
use crate::tpm::HashAlg;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

pub const POLICY_VERSION: u32 = 1;
/// grub 2 writes its commands and the kernel command line into PCR 8 and the
/// files it reads (kernel, initrd, grub.cfg, modules) into PCR 9.
const GRUB_STRING_PCR: u32 = 8;
const GRUB_FILE_PCR: u32 = 9;
const SECURE_BOOT_PCR: u32 = 7;
const KERNEL_CMDLINE_PREFIX: &str = "kernel_cmdline: ";
const GRUB_CMD_PREFIX: &str = "grub_cmd: ";

/// The reference policy, as stored and exchanged in JSON. Every check is
/// optional: a missing field is not checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootPolicy {
    pub version: u32,
    /// The bank whose event digests the digest lists hold.
    pub bank: HashAlg,
    /// Allowed digests (hex) of EV_EFI_PLATFORM_FIRMWARE_BLOB/_BLOB2 events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware_blobs: Option<BTreeSet<String>>,
    /// Allowed digests (hex) of EV_EFI_BOOT_SERVICES_APPLICATION events
    /// (shim, boot loader, kernel loaded by the firmware or shim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_applications: Option<BTreeSet<String>>,
    /// Allowed digests (hex) of the files grub measured (EV_IPL in PCR 9:
    /// kernel, initrd, grub.cfg, modules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grub_files: Option<BTreeSet<String>>,
    /// Regular expressions (Rust `regex` syntax, unanchored unless written
    /// with ^ and $); every kernel command line grub logged must match one.
    /// The text matched is what follows "kernel_cmdline: " or
    /// "grub_cmd: linux " / "grub_cmd: linuxefi ": the kernel path and its
    /// arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_cmdline: Option<Vec<String>>,
    /// Required Secure Boot state (the SecureBoot variable in PCR 7; a log
    /// without it counts as off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<bool>,
    /// Exact contents of PK, KEK and db; dbx must hold at least its entries
    /// (revocation lists only grow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pk: Option<SignatureSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek: Option<SignatureSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<SignatureSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbx: Option<SignatureSet>,
}

/// The entries of a signature database variable, by SHA-256 (hex).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureSet {
    /// SHA-256 of each X.509 certificate (DER), EFI_CERT_X509_GUID lists.
    #[serde(default)]
    pub x509: BTreeSet<String>,
    /// Image hashes, EFI_CERT_SHA256_GUID lists.
    #[serde(default)]
    pub sha256: BTreeSet<String>,
    /// Any other signature type: "TYPE-GUID:sha256-of-the-data".
    #[serde(default)]
    pub other: BTreeSet<String>,
}

impl SignatureSet {
    fn entries(&self) -> BTreeSet<String> {
        let x = self.x509.iter().map(|h| format!("x509:{h}"));
        let s = self.sha256.iter().map(|h| format!("sha256:{h}"));
        let o = self.other.iter().cloned();
        x.chain(s).chain(o).collect()
    }
    fn add(&mut self, entry: &eventlog::SignatureEntry) {
        let data_hash = hex::encode(HashAlg::Sha256.hash(&[&entry.data]));
        match entry.signature_type.as_str() {
            EFI_CERT_X509 => {
                self.x509.insert(data_hash);
            }
            EFI_CERT_SHA256 => {
                self.sha256.insert(hex::encode(&entry.data));
            }
            other => {
                self.other.insert(format!("{other}:{data_hash}"));
            }
        }
    }
}

/// What is wrong with a policy document itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootPolicyError {
    #[error("unsupported policy version {0} (this build reads version {POLICY_VERSION})")]
    Version(u32),
    #[error("{field}: invalid regular expression {pattern:?}: {detail}")]
    Regex {
        field: &'static str,
        pattern: String,
        detail: String,
    },
    #[error("{field}: {value:?} is not a {expected_len}-byte hex digest")]
    Digest {
        field: &'static str,
        value: String,
        expected_len: usize,
    },
    #[error("{field}: {value:?} is not \"GUID:sha256-hex\"")]
    OtherEntry { field: &'static str, value: String },
}

/// Machine-readable reason of a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootFaultCode {
    PolicyInvalid,
    BankMissing,
    EventDataMalformed,
    EventDataDigestMismatch,
    FirmwareBlobDigest,
    BootApplicationDigest,
    GrubFileDigest,
    KernelCmdline,
    KernelCmdlineMissing,
    SecureBoot,
    SignatureDbMissingEntry,
    SignatureDbExtraEntry,
}

impl BootFaultCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyInvalid => "policy_invalid",
            Self::BankMissing => "bank_missing",
            Self::EventDataMalformed => "event_data_malformed",
            Self::EventDataDigestMismatch => "event_data_digest_mismatch",
            Self::FirmwareBlobDigest => "firmware_blob_digest",
            Self::BootApplicationDigest => "boot_application_digest",
            Self::GrubFileDigest => "grub_file_digest",
            Self::KernelCmdline => "kernel_cmdline",
            Self::KernelCmdlineMissing => "kernel_cmdline_missing",
            Self::SecureBoot => "secure_boot",
            Self::SignatureDbMissingEntry => "signature_db_missing_entry",
            Self::SignatureDbExtraEntry => "signature_db_extra_entry",
        }
    }
}

/// One reason the log fails the policy, phrased for the person who has to
/// act on it: which event, in which PCR, what was expected and what was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootFault {
    pub code: BootFaultCode,
    /// Index of the event (as `tpm2_eventlog` numbers it), when one event is at fault.
    pub event_index: Option<u32>,
    pub pcr: Option<u32>,
    pub what: String,
    pub expected: String,
    pub actual: String,
}

impl fmt::Display for BootFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code.as_str())?;
        if let Some(i) = self.event_index {
            write!(f, " at event {i}")?;
        }
        if let Some(p) = self.pcr {
            write!(f, " (PCR {p})")?;
        }
        write!(
            f,
            ": {}; expected {}, found {}",
            self.what, self.expected, self.actual
        )
    }
}

impl BootFault {
    fn at(
        event: &Event,
        code: BootFaultCode,
        what: String,
        expected: String,
        actual: String,
    ) -> Self {
        Self {
            code,
            event_index: Some(event.index),
            pcr: Some(event.pcr),
            what,
            expected,
            actual,
        }
    }
}

/// A kernel command line grub logged, with the text the patterns apply to.
fn kernel_cmdline(event: &Event) -> Option<(&str, &str)> {
    if event.event_type != EV_IPL || event.pcr != GRUB_STRING_PCR {
        return None;
    }
    let text = eventlog::event_text(event)?;
    if let Some(rest) = text.strip_prefix(KERNEL_CMDLINE_PREFIX) {
        return Some((text, rest));
    }
    let cmd = text.strip_prefix(GRUB_CMD_PREFIX)?;
    ["linux ", "linuxefi "]
        .iter()
        .find_map(|verb| cmd.strip_prefix(verb))
        .map(|rest| (text, rest))
}

/// grub hashes the string after its "kernel_cmdline: " / "grub_cmd: "
/// prefix, without the NUL; check that the logged text is what was hashed.
fn grub_string_bound(event: &Event, text: &str, bank: HashAlg) -> bool {
    let hashed = text
        .strip_prefix(KERNEL_CMDLINE_PREFIX)
        .or_else(|| text.strip_prefix(GRUB_CMD_PREFIX))
        .unwrap_or(text);
    event.digest(bank) == Some(bank.hash(&[hashed.as_bytes()]).as_slice())
}

/// The variables of PCR 7 this policy reads.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PolicyVar {
    SecureBoot,
    Pk,
    Kek,
    Db,
    Dbx,
}

impl PolicyVar {
    fn of(var: &eventlog::UefiVariable) -> Option<Self> {
        match (var.guid.as_str(), var.name.as_str()) {
            (EFI_GLOBAL_VARIABLE, "SecureBoot") => Some(Self::SecureBoot),
            (EFI_GLOBAL_VARIABLE, "PK") => Some(Self::Pk),
            (EFI_GLOBAL_VARIABLE, "KEK") => Some(Self::Kek),
            (EFI_IMAGE_SECURITY_DATABASE, "db") => Some(Self::Db),
            (EFI_IMAGE_SECURITY_DATABASE, "dbx") => Some(Self::Dbx),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::SecureBoot => "SecureBoot",
            Self::Pk => "PK",
            Self::Kek => "KEK",
            Self::Db => "db",
            Self::Dbx => "dbx",
        }
    }
}

/// What the log says, collected once for both generation and evaluation.
struct Observed<'a> {
    secure_boot: Option<(&'a Event, bool)>,
    dbs: BTreeMap<PolicyVar, (&'a Event, SignatureSet)>,
}

fn hex_list(set: &BTreeSet<String>) -> String {
    const SHOWN: usize = 3;
    if set.is_empty() {
        return "no such event".into();
    }
    let head: Vec<&str> = set.iter().take(SHOWN).map(String::as_str).collect();
    if set.len() > SHOWN {
        format!("one of {} ({}, ...)", set.len(), head.join(", "))
    } else {
        format!("one of {}", head.join(", "))
    }
}

impl BootPolicy {
    /// The policy a known-good host's log satisfies: its digests, command
    /// lines, Secure Boot state and signature databases.
    pub fn from_eventlog(log: &EventLog) -> BootPolicy {
        let banks = log.banks();
        let bank = [
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
            HashAlg::Sha1,
        ]
        .into_iter()
        .find(|b| banks.contains(b))
        .unwrap_or(HashAlg::Sha256);
        let digests = |pred: &dyn Fn(&Event) -> bool| -> BTreeSet<String> {
            log.events
                .iter()
                .filter(|e| pred(e))
                .filter_map(|e| e.digest(bank).map(hex::encode))
                .collect()
        };
        let firmware_blobs = digests(&|e| is_firmware_blob(e));
        let boot_applications = digests(&|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION);
        let grub_files = digests(&|e| e.event_type == EV_IPL && e.pcr == GRUB_FILE_PCR);
        let mut cmdlines: Vec<String> = Vec::new();
        // Only command lines the TPM measured: a logged string that does not
        // hash to its event's digest is not evidence and must not become
        // policy (the same events that `evaluate` refuses).
        let bound = log
            .events
            .iter()
            .filter_map(|e| kernel_cmdline(e).filter(|(text, _)| grub_string_bound(e, text, bank)));
        for (_, line) in bound {
            let pattern = format!("^{}$", regex::escape(line));
            if !cmdlines.contains(&pattern) {
                cmdlines.push(pattern);
            }
        }
        let (observed, _) = observe(log, bank);
        let db_of = |v: PolicyVar| {
            Some(
                observed
                    .dbs
                    .get(&v)
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default(),
            )
        };
        BootPolicy {
            version: POLICY_VERSION,
            bank,
            firmware_blobs: Some(firmware_blobs),
            boot_applications: Some(boot_applications),
            grub_files: Some(grub_files),
            kernel_cmdline: Some(cmdlines),
            secure_boot: Some(observed.secure_boot.is_some_and(|(_, on)| on)),
            pk: db_of(PolicyVar::Pk),
            kek: db_of(PolicyVar::Kek),
            db: db_of(PolicyVar::Db),
            dbx: db_of(PolicyVar::Dbx),
        }
    }

    /// Check the policy document itself: version, regular expressions, and
    /// that every digest is hex of the right length.
    pub fn validate(&self) -> Result<(), BootPolicyError> {
        self.compile().map(|_| ())
    }

    fn compile(&self) -> Result<Vec<Regex>, BootPolicyError> {
        if self.version != POLICY_VERSION {
            return Err(BootPolicyError::Version(self.version));
        }
        let check = |field: &'static str, set: &Option<BTreeSet<String>>, len: usize| {
            for value in set.iter().flatten() {
                check_hex(field, value, len)?;
            }
            Ok::<(), BootPolicyError>(())
        };
        let n = self.bank.digest_len();
        check("firmware_blobs", &self.firmware_blobs, n)?;
        check("boot_applications", &self.boot_applications, n)?;
        check("grub_files", &self.grub_files, n)?;
        for (field, set) in [
            ("pk", &self.pk),
            ("kek", &self.kek),
            ("db", &self.db),
            ("dbx", &self.dbx),
        ] {
            let Some(set) = set else { continue };
            for v in set.x509.iter().chain(&set.sha256) {
                check_hex(field, v, 32)?;
            }
            for v in &set.other {
                let ok = v
                    .split_once(':')
                    .is_some_and(|(guid, h)| guid.len() == 36 && check_hex(field, h, 32).is_ok());
                if !ok {
                    return Err(BootPolicyError::OtherEntry {
                        field,
                        value: v.clone(),
                    });
                }
            }
        }
        self.kernel_cmdline
            .iter()
            .flatten()
            .map(|p| {
                Regex::new(p).map_err(|e| BootPolicyError::Regex {
                    field: "kernel_cmdline",
                    pattern: p.clone(),
                    detail: e.to_string(),
                })
            })
            .collect()
    }

    /// Every way `log` fails this policy, in event order (the first fault is
    /// the first failing event); empty means the log passes.
    pub fn evaluate(&self, log: &EventLog) -> Vec<BootFault> {
        let patterns = match self.compile() {
            Ok(p) => p,
            Err(e) => {
                return vec![BootFault {
                    code: BootFaultCode::PolicyInvalid,
                    event_index: None,
                    pcr: None,
                    what: "the boot policy".into(),
                    expected: "a valid policy".into(),
                    actual: e.to_string(),
                }]
            }
        };
        let bank = self.bank;
        if !log.banks().contains(&bank) {
            return vec![BootFault {
                code: BootFaultCode::BankMissing,
                event_index: None,
                pcr: None,
                what: format!("the policy's {bank} bank"),
                expected: format!("{bank} digests in the event log"),
                actual: format!(
                    "banks {}",
                    log.banks()
                        .iter()
                        .map(|b| b.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }];
        }
        let (observed, mut faults) = observe(log, bank);
        let hex_digest = |e: &Event| e.digest(bank).map(hex::encode).unwrap_or_default();
        let mut saw_cmdline = false;
        for event in &log.events {
            let allowed = if is_firmware_blob(event) {
                Some((
                    &self.firmware_blobs,
                    BootFaultCode::FirmwareBlobDigest,
                    "firmware blob",
                ))
            } else if event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION {
                Some((
                    &self.boot_applications,
                    BootFaultCode::BootApplicationDigest,
                    "boot application",
                ))
            } else if event.event_type == EV_IPL && event.pcr == GRUB_FILE_PCR {
                Some((
                    &self.grub_files,
                    BootFaultCode::GrubFileDigest,
                    "file loaded by grub",
                ))
            } else {
                None
            };
            if let Some((Some(set), code, kind)) = allowed {
                let actual = hex_digest(event);
                if !set.contains(&actual) {
                    let name = match event.event_type {
                        EV_EFI_BOOT_SERVICES_APPLICATION => eventlog::image_load_path(event),
                        EV_IPL => eventlog::event_text(event).map(str::to_string),
                        _ => None,
                    };
                    let what = match name {
                        Some(n) => format!("{kind} {n:?} ({})", event.type_name()),
                        None => format!("{kind} ({})", event.type_name()),
                    };
                    faults.push(BootFault::at(event, code, what, hex_list(set), actual));
                }
            }
            if let (Some(_), Some((text, line))) = (&self.kernel_cmdline, kernel_cmdline(event)) {
                saw_cmdline = true;
                if !grub_string_bound(event, text, bank) {
                    faults.push(BootFault::at(
                        event,
                        BootFaultCode::EventDataDigestMismatch,
                        format!("grub string {text:?}"),
                        format!("{bank} of the logged text"),
                        hex_digest(event),
                    ));
                } else if !patterns.iter().any(|p| p.is_match(line)) {
                    faults.push(BootFault::at(
                        event,
                        BootFaultCode::KernelCmdline,
                        "kernel command line".into(),
                        format!(
                            "a match for one of {:?}",
                            self.kernel_cmdline.iter().flatten().collect::<Vec<_>>()
                        ),
                        line.to_string(),
                    ));
                }
            }
            self.check_variables(event, &observed, &mut faults);
        }
        if let Some(patterns) = &self.kernel_cmdline {
            if !patterns.is_empty() && !saw_cmdline {
                faults.push(BootFault {
                    code: BootFaultCode::KernelCmdlineMissing,
                    event_index: None,
                    pcr: Some(GRUB_STRING_PCR),
                    what: "kernel command line".into(),
                    expected: "a kernel_cmdline or grub_cmd linux event in PCR 8".into(),
                    actual: "none logged".into(),
                });
            }
        }
        if let (Some(want), None) = (self.secure_boot, observed.secure_boot) {
            if want {
                faults.push(BootFault {
                    code: BootFaultCode::SecureBoot,
                    event_index: None,
                    pcr: Some(SECURE_BOOT_PCR),
                    what: "Secure Boot state (SecureBoot variable)".into(),
                    expected: "on".into(),
                    actual: "not logged (off)".into(),
                });
            }
        }
        for (var, want) in self.db_policies() {
            if observed.dbs.contains_key(&var) {
                continue;
            }
            // Not logged: compare against an empty database.
            compare_db(var, None, want, &SignatureSet::default(), &mut faults);
        }
        faults
    }

    fn db_policies(&self) -> Vec<(PolicyVar, &SignatureSet)> {
        [
            (PolicyVar::Pk, &self.pk),
            (PolicyVar::Kek, &self.kek),
            (PolicyVar::Db, &self.db),
            (PolicyVar::Dbx, &self.dbx),
        ]
        .into_iter()
        .filter_map(|(v, s)| s.as_ref().map(|s| (v, s)))
        .collect()
    }

    /// Faults for the PCR 7 variable `event` carries, at that event.
    fn check_variables(&self, event: &Event, observed: &Observed<'_>, faults: &mut Vec<BootFault>) {
        if let (Some(want), Some((e, on))) = (self.secure_boot, observed.secure_boot) {
            if std::ptr::eq(e, event) && want != on {
                let state = |b: bool| if b { "on" } else { "off" };
                faults.push(BootFault::at(
                    event,
                    BootFaultCode::SecureBoot,
                    "Secure Boot state (SecureBoot variable)".into(),
                    state(want).into(),
                    state(on).into(),
                ));
            }
        }
        for (var, want) in self.db_policies() {
            if let Some((e, have)) = observed.dbs.get(&var) {
                if std::ptr::eq(*e, event) {
                    compare_db(var, Some(event), want, have, faults);
                }
            }
        }
    }
}

fn check_hex(field: &'static str, value: &str, len: usize) -> Result<(), BootPolicyError> {
    let ok = value.len() == len * 2
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BootPolicyError::Digest {
            field,
            value: value.to_string(),
            expected_len: len,
        })
    }
}

fn is_firmware_blob(e: &Event) -> bool {
    e.event_type == EV_EFI_PLATFORM_FIRMWARE_BLOB || e.event_type == EV_EFI_PLATFORM_FIRMWARE_BLOB2
}

/// Read the PCR 7 variables the policy checks. Malformed data, or data that
/// does not hash to the event's digest, yields a fault and is not used.
fn observe(log: &EventLog, bank: HashAlg) -> (Observed<'_>, Vec<BootFault>) {
    let mut observed = Observed {
        secure_boot: None,
        dbs: BTreeMap::new(),
    };
    let mut faults = Vec::new();
    for event in log
        .events
        .iter()
        .filter(|e| e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG)
    {
        let var = match eventlog::parse_uefi_variable(event) {
            Ok(v) => v,
            Err(e) => {
                faults.push(BootFault::at(
                    event,
                    BootFaultCode::EventDataMalformed,
                    "UEFI variable event data".into(),
                    "UEFI_VARIABLE_DATA".into(),
                    e.to_string(),
                ));
                continue;
            }
        };
        let Some(which) = PolicyVar::of(&var) else {
            continue;
        };
        // EV_EFI_VARIABLE_DRIVER_CONFIG digests cover the whole UEFI_VARIABLE_DATA.
        let computed = bank.hash(&[&event.data]);
        if event.digest(bank) != Some(computed.as_slice()) {
            faults.push(BootFault::at(
                event,
                BootFaultCode::EventDataDigestMismatch,
                format!("{} variable data", which.name()),
                hex::encode(&computed),
                event.digest(bank).map(hex::encode).unwrap_or_default(),
            ));
            continue;
        }
        if which == PolicyVar::SecureBoot {
            observed.secure_boot = Some((event, var.data.first() == Some(&1)));
            continue;
        }
        match eventlog::parse_signature_lists(event, &var.data) {
            Ok(entries) => {
                let set = &mut observed
                    .dbs
                    .entry(which)
                    .or_insert((event, SignatureSet::default()))
                    .1;
                for entry in &entries {
                    set.add(entry);
                }
            }
            Err(e) => faults.push(BootFault::at(
                event,
                BootFaultCode::EventDataMalformed,
                format!("{} variable data", which.name()),
                "EFI_SIGNATURE_LISTs".into(),
                e.to_string(),
            )),
        }
    }
    (observed, faults)
}

fn compare_db(
    var: PolicyVar,
    event: Option<&Event>,
    want: &SignatureSet,
    have: &SignatureSet,
    faults: &mut Vec<BootFault>,
) {
    let want = want.entries();
    let have = have.entries();
    let fault = |code, what: String, expected: String, actual: String| BootFault {
        code,
        event_index: event.map(|e| e.index),
        pcr: Some(SECURE_BOOT_PCR),
        what,
        expected,
        actual,
    };
    for missing in want.difference(&have) {
        faults.push(fault(
            BootFaultCode::SignatureDbMissingEntry,
            format!("{} entry {missing}", var.name()),
            "present".into(),
            if event.is_some() {
                "absent"
            } else {
                "variable not logged"
            }
            .into(),
        ));
    }
    // dbx may grow: extra revocations are fine.
    if var != PolicyVar::Dbx {
        for extra in have.difference(&want) {
            faults.push(fault(
                BootFaultCode::SignatureDbExtraEntry,
                format!("{} entry {extra}", var.name()),
                "absent".into(),
                "present".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::eventlog::{parse, EV_EFI_BOOT_SERVICES_APPLICATION};
    use std::path::PathBuf;

    fn log(name: &str) -> (Vec<u8>, EventLog) {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/eventlog")
            .join(name);
        let bytes = std::fs::read(&p).unwrap();
        let log = parse(&bytes).unwrap();
        (bytes, log)
    }

    const GOOD: &[&str] = &[
        "create-mb-policy.bin",
        "create-mb-policy-secureboot.bin",
        "mb_log.bin",
        "rust-keylime-uefi_log.bin",
    ];

    #[test]
    fn generated_policy_passes_its_own_log_and_round_trips_json() {
        for name in GOOD {
            let (_, l) = log(name);
            let p = BootPolicy::from_eventlog(&l);
            p.validate().unwrap();
            assert_eq!(p.evaluate(&l), vec![], "{name}");
            assert!(!p.boot_applications.as_ref().unwrap().is_empty(), "{name}");
            assert!(!p.kernel_cmdline.as_ref().unwrap().is_empty(), "{name}");
            let json = serde_json::to_string_pretty(&p).unwrap();
            let back: BootPolicy = serde_json::from_str(&json).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn secure_boot_detected() {
        let (_, on) = log("create-mb-policy-secureboot.bin");
        let (_, off) = log("create-mb-policy.bin");
        let p_on = BootPolicy::from_eventlog(&on);
        let p_off = BootPolicy::from_eventlog(&off);
        assert_eq!(p_on.secure_boot, Some(true));
        assert_eq!(p_off.secure_boot, Some(false));
        assert!(!p_on.db.as_ref().unwrap().x509.is_empty());
        assert!(!p_on.dbx.as_ref().unwrap().sha256.is_empty());
        // Requiring Secure Boot on the off log: the fault is at the
        // SecureBoot variable's event in PCR 7.
        let mut want_on = p_off.clone();
        want_on.secure_boot = Some(true);
        let faults = want_on.evaluate(&off);
        assert_eq!(faults.len(), 1, "{faults:?}");
        let f = &faults[0];
        assert_eq!(f.code, BootFaultCode::SecureBoot);
        assert_eq!(f.pcr, Some(7));
        assert_eq!((f.expected.as_str(), f.actual.as_str()), ("on", "off"));
        let ev = off
            .events
            .iter()
            .find(|e| e.index == f.event_index.unwrap())
            .unwrap();
        assert_eq!(
            eventlog::parse_uefi_variable(ev).unwrap().name,
            "SecureBoot"
        );
    }

    #[test]
    fn altered_boot_application_digest_names_the_event() {
        let (_, l) = log("create-mb-policy-secureboot.bin");
        let p = BootPolicy::from_eventlog(&l);
        let mut bad = l.clone();
        let target = bad
            .events
            .iter_mut()
            .filter(|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
            .nth(1)
            .unwrap();
        let (index, pcr) = (target.index, target.pcr);
        let original = hex::encode(target.digest(HashAlg::Sha256).unwrap());
        target.digests[0].digest[0] ^= 0xff;
        let actual = hex::encode(&target.digests[0].digest);
        let faults = p.evaluate(&bad);
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].code, BootFaultCode::BootApplicationDigest);
        assert_eq!(faults[0].event_index, Some(index));
        assert_eq!(faults[0].pcr, Some(pcr));
        assert_eq!(faults[0].actual, actual);
        assert!(faults[0].expected.contains(&original) || faults[0].expected.starts_with("one of"));
        assert!(faults[0].to_string().contains(&format!("event {index}")));
    }

    #[test]
    fn altered_kernel_cmdline_with_matching_digest_fails_the_pattern() {
        let (_, l) = log("create-mb-policy.bin");
        let p = BootPolicy::from_eventlog(&l);
        let mut bad = l.clone();
        let target = bad
            .events
            .iter_mut()
            .find(|e| eventlog::event_text(e).is_some_and(|t| t.starts_with("kernel_cmdline: ")))
            .unwrap();
        let index = target.index;
        let text = eventlog::event_text(target)
            .unwrap()
            .replace(" quiet", " init=/bin/sh");
        target.data = format!("{text}\0").into_bytes();
        let hashed = text
            .strip_prefix("kernel_cmdline: ")
            .unwrap()
            .as_bytes()
            .to_vec();
        for d in &mut target.digests {
            d.digest = d.alg.unwrap().hash(&[&hashed]);
        }
        let faults = p.evaluate(&bad);
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].code, BootFaultCode::KernelCmdline);
        assert_eq!(
            (faults[0].event_index, faults[0].pcr),
            (Some(index), Some(8))
        );
        assert!(faults[0].actual.contains("init=/bin/sh"));
        // Changing only the data (digest kept) is caught as unbound data.
        let mut unbound = l.clone();
        let t = unbound
            .events
            .iter_mut()
            .find(|e| e.index == index)
            .unwrap();
        t.data = format!("{text}\0").into_bytes();
        let faults = p.evaluate(&unbound);
        assert_eq!(faults[0].code, BootFaultCode::EventDataDigestMismatch);
        assert_eq!(faults[0].event_index, Some(index));
        // A policy generated from that log does not take the forged string.
        let generated = BootPolicy::from_eventlog(&unbound);
        let patterns = generated.kernel_cmdline.unwrap_or_default();
        assert!(
            !patterns.iter().any(|p| p.contains("init=/bin/sh")),
            "{patterns:?}"
        );
    }

    #[test]
    fn db_changes_are_named() {
        let (_, l) = log("create-mb-policy-secureboot.bin");
        let mut p = BootPolicy::from_eventlog(&l);
        let db = p.db.as_mut().unwrap();
        let removed = db.x509.pop_first().unwrap();
        db.x509.insert("00".repeat(32));
        let dbx = p.dbx.as_mut().unwrap();
        dbx.sha256.pop_first().unwrap(); // fewer required revocations: fine
        let faults = p.evaluate(&l);
        let codes: Vec<_> = faults.iter().map(|f| (f.code, f.what.clone())).collect();
        assert_eq!(faults.len(), 2, "{codes:?}");
        assert!(faults
            .iter()
            .any(|f| f.code == BootFaultCode::SignatureDbMissingEntry
                && f.what == format!("db entry x509:{}", "00".repeat(32))));
        assert!(faults
            .iter()
            .any(|f| f.code == BootFaultCode::SignatureDbExtraEntry
                && f.what == format!("db entry x509:{removed}")));
        assert!(faults
            .iter()
            .all(|f| f.pcr == Some(7) && f.event_index.is_some()));
    }

    #[test]
    fn policy_from_one_host_fails_another() {
        let (_, a) = log("create-mb-policy-secureboot.bin");
        let (_, b) = log("mb_log.bin");
        let faults = BootPolicy::from_eventlog(&a).evaluate(&b);
        assert!(!faults.is_empty());
        // Faults come in event order.
        let idx: Vec<u32> = faults.iter().filter_map(|f| f.event_index).collect();
        let mut sorted = idx.clone();
        sorted.sort();
        assert_eq!(idx, sorted);
    }

    #[test]
    fn validate_rejects_bad_policies() {
        let (_, l) = log("mb_log.bin");
        let good = BootPolicy::from_eventlog(&l);
        let mut p = good.clone();
        p.kernel_cmdline = Some(vec!["(unclosed".into()]);
        assert!(matches!(p.validate(), Err(BootPolicyError::Regex { .. })));
        assert_eq!(p.evaluate(&l)[0].code, BootFaultCode::PolicyInvalid);
        let mut p = good.clone();
        p.boot_applications.as_mut().unwrap().insert("abcd".into());
        assert!(matches!(
            p.validate(),
            Err(BootPolicyError::Digest {
                field: "boot_applications",
                ..
            })
        ));
        let mut p = good.clone();
        p.firmware_blobs.as_mut().unwrap().insert("ZZ".repeat(32));
        assert!(p.validate().is_err());
        let mut p = good.clone();
        p.version = 2;
        assert_eq!(p.validate(), Err(BootPolicyError::Version(2)));
        let mut p = good;
        p.bank = HashAlg::Sha384;
        p.firmware_blobs = None;
        p.boot_applications = None;
        p.grub_files = None;
        assert_eq!(p.evaluate(&l)[0].code, BootFaultCode::BankMissing);
        assert!(
            serde_json::from_str::<BootPolicy>(r#"{"version":1,"bank":"sha256","bogus":1}"#)
                .is_err()
        );
    }
}
