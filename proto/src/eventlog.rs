//! TCG PC Client crypto-agile event log (the format of Linux's
//! `/sys/kernel/security/tpm0/binary_bios_measurements`): parsing, replay to
//! PCR values, and the check of a replay against quoted PCRs.
//!
//! Layout (TCG PC Client Platform Firmware Profile, all integers
//! little-endian): first a legacy TCG_PCClientPCREvent (pcrIndex, eventType,
//! a 20-byte SHA-1 digest, eventSize, event) of type EV_NO_ACTION whose event
//! is the TCG_EfiSpecIdEvent "Spec ID Event03" listing the algorithm ids and
//! digest sizes of every event that follows; then TCG_PCR_EVENT2 records
//! (pcrIndex, eventType, TPML_DIGEST_VALUES, eventSize, event).
//!
//! The log is untrusted input: every read is bounds-checked, nothing is
//! allocated from a length field before the bytes are known to be there, and
//! every error names the byte offset where decoding stopped.

use crate::tpm::HashAlg;
use std::collections::BTreeMap;

pub const EV_PREBOOT_CERT: u32 = 0x0000_0000;
pub const EV_POST_CODE: u32 = 0x0000_0001;
pub const EV_NO_ACTION: u32 = 0x0000_0003;
pub const EV_SEPARATOR: u32 = 0x0000_0004;
pub const EV_ACTION: u32 = 0x0000_0005;
pub const EV_EVENT_TAG: u32 = 0x0000_0006;
pub const EV_S_CRTM_CONTENTS: u32 = 0x0000_0007;
pub const EV_S_CRTM_VERSION: u32 = 0x0000_0008;
pub const EV_CPU_MICROCODE: u32 = 0x0000_0009;
pub const EV_PLATFORM_CONFIG_FLAGS: u32 = 0x0000_000a;
pub const EV_TABLE_OF_DEVICES: u32 = 0x0000_000b;
pub const EV_COMPACT_HASH: u32 = 0x0000_000c;
pub const EV_IPL: u32 = 0x0000_000d;
pub const EV_IPL_PARTITION_DATA: u32 = 0x0000_000e;
pub const EV_NONHOST_CODE: u32 = 0x0000_000f;
pub const EV_NONHOST_CONFIG: u32 = 0x0000_0010;
pub const EV_NONHOST_INFO: u32 = 0x0000_0011;
pub const EV_OMIT_BOOT_DEVICE_EVENTS: u32 = 0x0000_0012;
pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
pub const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
pub const EV_EFI_BOOT_SERVICES_DRIVER: u32 = 0x8000_0004;
pub const EV_EFI_RUNTIME_SERVICES_DRIVER: u32 = 0x8000_0005;
pub const EV_EFI_GPT_EVENT: u32 = 0x8000_0006;
pub const EV_EFI_ACTION: u32 = 0x8000_0007;
pub const EV_EFI_PLATFORM_FIRMWARE_BLOB: u32 = 0x8000_0008;
pub const EV_EFI_HANDOFF_TABLES: u32 = 0x8000_0009;
pub const EV_EFI_PLATFORM_FIRMWARE_BLOB2: u32 = 0x8000_000a;
pub const EV_EFI_HANDOFF_TABLES2: u32 = 0x8000_000b;
pub const EV_EFI_VARIABLE_BOOT2: u32 = 0x8000_000c;
pub const EV_EFI_HCRTM_EVENT: u32 = 0x8000_0010;
pub const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00e0;
pub const EV_EFI_SPDM_FIRMWARE_BLOB: u32 = 0x8000_00e1;
pub const EV_EFI_SPDM_FIRMWARE_CONFIG: u32 = 0x8000_00e2;

/// EFI_GLOBAL_VARIABLE: owner of SecureBoot, PK and KEK.
pub const EFI_GLOBAL_VARIABLE: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// EFI_IMAGE_SECURITY_DATABASE_GUID: owner of db and dbx.
pub const EFI_IMAGE_SECURITY_DATABASE: &str = "d719b2cb-3d3a-4596-a3bc-dad00e67656f";
/// EFI_CERT_SHA256_GUID: a signature list of SHA-256 image hashes.
pub const EFI_CERT_SHA256: &str = "c1c41626-504c-4092-aca9-41f936934328";
/// EFI_CERT_X509_GUID: a signature list of DER certificates.
pub const EFI_CERT_X509: &str = "a5c059a1-94e4-4aa7-87b5-ab155c2bf072";

const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
/// SHA-1-only (pre crypto-agile) logs carry this signature instead.
const SPEC_ID_SIGNATURE_SHA1: &[u8; 16] = b"Spec ID Event00\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";
/// The largest digest any TCG-registered hash has (SHA-512, SHA3-512).
const MAX_DIGEST_SIZE: u16 = 64;

/// Why a log could not be decoded. Every variant names the byte offset (from
/// the start of the log) of the field that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogError {
    #[error("event log is empty (0 bytes)")]
    Empty,
    #[error(
        "event log truncated at byte {offset}: {field} needs {needed} bytes, {available} left"
    )]
    Truncated {
        offset: usize,
        field: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("bad Spec ID header at byte {offset}: {detail}")]
    BadHeader { offset: usize, detail: String },
    #[error(
        "byte {offset}: SHA-1-only log (\"Spec ID Event00\"); only crypto-agile logs are supported"
    )]
    NotCryptoAgile { offset: usize },
    #[error("event {index} at byte {offset}: algorithm 0x{alg_id:04x} is not listed in the Spec ID header")]
    UnknownAlgorithm {
        offset: usize,
        index: u32,
        alg_id: u16,
    },
    #[error("byte {offset}: Spec ID header gives algorithm 0x{alg_id:04x} digest size {size}")]
    BadDigestSize {
        offset: usize,
        alg_id: u16,
        size: u16,
    },
    #[error("byte {offset}: algorithm 0x{alg_id:04x} appears twice in {place}")]
    DuplicateAlgorithm {
        offset: usize,
        alg_id: u16,
        place: &'static str,
    },
    #[error("event {index} at byte {offset}: {count} digests, the Spec ID header lists {expected} algorithms")]
    DigestCount {
        offset: usize,
        index: u32,
        count: u32,
        expected: usize,
    },
    #[error("event {index}: malformed {structure} at byte {offset}: {detail}")]
    BadEventData {
        offset: usize,
        index: u32,
        structure: &'static str,
        detail: String,
    },
}

impl EventLogError {
    /// Stable machine-readable code, for API responses and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty => "eventlog_empty",
            Self::Truncated { .. } => "eventlog_truncated",
            Self::BadHeader { .. } => "eventlog_bad_header",
            Self::NotCryptoAgile { .. } => "eventlog_not_crypto_agile",
            Self::UnknownAlgorithm { .. } => "eventlog_unknown_algorithm",
            Self::BadDigestSize { .. } => "eventlog_bad_digest_size",
            Self::DuplicateAlgorithm { .. } => "eventlog_duplicate_algorithm",
            Self::DigestCount { .. } => "eventlog_digest_count",
            Self::BadEventData { .. } => "eventlog_bad_event_data",
        }
    }
    /// Byte offset in the log where decoding failed (0 for an empty log).
    pub fn offset(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::Truncated { offset, .. }
            | Self::BadHeader { offset, .. }
            | Self::NotCryptoAgile { offset }
            | Self::UnknownAlgorithm { offset, .. }
            | Self::BadDigestSize { offset, .. }
            | Self::DuplicateAlgorithm { offset, .. }
            | Self::DigestCount { offset, .. }
            | Self::BadEventData { offset, .. } => *offset,
        }
    }
}

/// One algorithm of the Spec ID header. `alg` is `None` for registered
/// algorithms this crate cannot hash (SM3 and others): their digests are
/// parsed (the header gives their size) but not replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAlgorithm {
    pub alg_id: u16,
    pub alg: Option<HashAlg>,
    pub digest_size: u16,
}

/// The TCG_EfiSpecIdEvent fields that matter to a verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecId {
    pub platform_class: u32,
    pub spec_version_major: u8,
    pub spec_version_minor: u8,
    pub spec_errata: u8,
    pub uintn_size: u8,
    pub vendor_info: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDigest {
    pub alg_id: u16,
    pub alg: Option<HashAlg>,
    pub digest: Vec<u8>,
}

/// One TCG_PCR_EVENT2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log; the Spec ID header is 0, so the first event is 1
    /// (the numbering `tpm2_eventlog` prints as EventNum).
    pub index: u32,
    pub pcr: u32,
    pub event_type: u32,
    pub digests: Vec<EventDigest>,
    pub data: Vec<u8>,
    /// Byte offset of the event's first field (pcrIndex) in the log.
    pub offset: usize,
    /// Byte offset of the event data in the log.
    pub data_offset: usize,
}

impl Event {
    /// This event's digest in `bank`, if the log has that bank.
    pub fn digest(&self, bank: HashAlg) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|d| d.alg == Some(bank))
            .map(|d| d.digest.as_slice())
    }
    pub fn type_name(&self) -> &'static str {
        event_type_name(self.event_type)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    pub spec_id: SpecId,
    pub algorithms: Vec<LogAlgorithm>,
    pub events: Vec<Event>,
}

/// PCR values per bank and index.
pub type PcrBanks = BTreeMap<HashAlg, BTreeMap<u32, Vec<u8>>>;

/// The replay disagrees with the quote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayMismatch {
    #[error("the event log has no {bank} bank")]
    BankNotInLog { bank: HashAlg },
    #[error("{bank} PCR {pcr}: the event log extends it (last by event {last_event}) but the quote does not cover it")]
    NotQuoted {
        bank: HashAlg,
        pcr: u32,
        replayed: Vec<u8>,
        last_event: u32,
    },
    #[error("{bank} PCR {pcr}: quoted {}, the event log replays to {} (last event into it: {last_event})", hex::encode(quoted), hex::encode(replayed))]
    Differs {
        bank: HashAlg,
        pcr: u32,
        quoted: Vec<u8>,
        replayed: Vec<u8>,
        last_event: u32,
    },
}

impl ReplayMismatch {
    pub fn code(&self) -> &'static str {
        match self {
            Self::BankNotInLog { .. } => "eventlog_bank_missing",
            Self::NotQuoted { .. } => "eventlog_pcr_not_quoted",
            Self::Differs { .. } => "eventlog_replay_mismatch",
        }
    }
}

/// Bounds-checked little-endian reader; offsets are absolute in the log.
struct LeReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> LeReader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], EventLogError> {
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(EventLogError::Truncated {
                offset: self.pos,
                field,
                needed: n,
                available: self.remaining(),
            })?;
        self.pos += n;
        Ok(out)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EventLogError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, field)?);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, EventLogError> {
        Ok(u8::from_le_bytes(self.array(field)?))
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, EventLogError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, EventLogError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, EventLogError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
}

/// Parse a whole crypto-agile event log. A log that ends exactly at an event
/// boundary is complete (the kernel exposes the log as it stands); a log that
/// ends inside an event is an error.
pub fn parse(bytes: &[u8]) -> Result<EventLog, EventLogError> {
    if bytes.is_empty() {
        return Err(EventLogError::Empty);
    }
    let mut r = LeReader { buf: bytes, pos: 0 };
    let pcr = r.u32("header pcrIndex")?;
    let event_type = r.u32("header eventType")?;
    // Checked before reading further so that a file that is not an event
    // log at all is named as such rather than as truncated.
    if pcr != 0 || event_type != EV_NO_ACTION {
        return Err(EventLogError::BadHeader {
            offset: 0,
            detail: format!(
                "first event must be EV_NO_ACTION in PCR 0, found type 0x{event_type:08x} in PCR {pcr}"
            ),
        });
    }
    let digest = r.bytes(20, "header SHA-1 digest")?;
    let size_offset = r.pos;
    let size = r.u32("header eventSize")?;
    let data_offset = r.pos;
    let data = r.bytes(size as usize, "header event data (TCG_EfiSpecIdEvent)")?;
    if digest.iter().any(|&b| b != 0) {
        return Err(EventLogError::BadHeader {
            offset: 8,
            detail: "the Spec ID event's digest must be zero".into(),
        });
    }
    let (spec_id, algorithms) = parse_spec_id(data, data_offset, size_offset)?;

    let mut events = Vec::new();
    let mut index: u32 = 0;
    while r.remaining() > 0 {
        index = index.saturating_add(1);
        events.push(parse_event2(&mut r, index, &algorithms)?);
    }
    Ok(EventLog {
        spec_id,
        algorithms,
        events,
    })
}

fn parse_spec_id(
    data: &[u8],
    base: usize,
    size_offset: usize,
) -> Result<(SpecId, Vec<LogAlgorithm>), EventLogError> {
    // The sub-reader sees only the header's event data, so a short header is
    // reported as truncated at its own end, with absolute offsets.
    let mut r = LeReader { buf: data, pos: 0 };
    let abs = |r: &LeReader<'_>| base + r.pos;
    let sig: [u8; 16] = r
        .array("Spec ID signature")
        .map_err(|e| rebase(e, base, size_offset))?;
    if &sig == SPEC_ID_SIGNATURE_SHA1 {
        return Err(EventLogError::NotCryptoAgile { offset: base });
    }
    if &sig != SPEC_ID_SIGNATURE {
        return Err(EventLogError::BadHeader {
            offset: base,
            detail: format!(
                "signature is {:?}, expected \"Spec ID Event03\"",
                String::from_utf8_lossy(&sig)
            ),
        });
    }
    let mut field = || -> Result<SpecId, EventLogError> {
        let platform_class = r.u32("Spec ID platformClass")?;
        let spec_version_minor = r.u8("Spec ID specVersionMinor")?;
        let spec_version_major = r.u8("Spec ID specVersionMajor")?;
        let spec_errata = r.u8("Spec ID specErrata")?;
        let uintn_size = r.u8("Spec ID uintnSize")?;
        Ok(SpecId {
            platform_class,
            spec_version_major,
            spec_version_minor,
            spec_errata,
            uintn_size,
            vendor_info: Vec::new(),
        })
    };
    let mut spec_id = field().map_err(|e| rebase(e, base, size_offset))?;
    let count_offset = abs(&r);
    let count = r
        .u32("Spec ID numberOfAlgorithms")
        .map_err(|e| rebase(e, base, size_offset))?;
    if count == 0 {
        return Err(EventLogError::BadHeader {
            offset: count_offset,
            detail: "numberOfAlgorithms is 0".into(),
        });
    }
    // Each entry takes 4 bytes: refuse counts the header cannot hold before
    // allocating anything for them.
    let needed = (count as usize).saturating_mul(4);
    if needed > r.remaining() {
        return Err(EventLogError::Truncated {
            offset: abs(&r),
            field: "Spec ID algorithm list",
            needed,
            available: r.remaining(),
        });
    }
    let mut algorithms: Vec<LogAlgorithm> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let entry_offset = abs(&r);
        let alg_id = r
            .u16("Spec ID algorithmId")
            .map_err(|e| rebase(e, base, size_offset))?;
        let digest_size = r
            .u16("Spec ID digestSize")
            .map_err(|e| rebase(e, base, size_offset))?;
        let alg = HashAlg::from_tpm(alg_id);
        let size_ok = match alg {
            Some(a) => usize::from(digest_size) == a.digest_len(),
            None => digest_size > 0 && digest_size <= MAX_DIGEST_SIZE,
        };
        if !size_ok {
            return Err(EventLogError::BadDigestSize {
                offset: entry_offset,
                alg_id,
                size: digest_size,
            });
        }
        if algorithms.iter().any(|a| a.alg_id == alg_id) {
            return Err(EventLogError::DuplicateAlgorithm {
                offset: entry_offset,
                alg_id,
                place: "the Spec ID header",
            });
        }
        algorithms.push(LogAlgorithm {
            alg_id,
            alg,
            digest_size,
        });
    }
    let vendor_size = r
        .u8("Spec ID vendorInfoSize")
        .map_err(|e| rebase(e, base, size_offset))?;
    spec_id.vendor_info = r
        .bytes(usize::from(vendor_size), "Spec ID vendorInfo")
        .map_err(|e| rebase(e, base, size_offset))?
        .to_vec();
    Ok((spec_id, algorithms))
}

/// Errors from the header sub-reader carry offsets relative to the header's
/// event data; make them absolute. A header event too short for its own
/// fields is a header problem (its eventSize is wrong), so report it there.
fn rebase(e: EventLogError, base: usize, size_offset: usize) -> EventLogError {
    match e {
        EventLogError::Truncated {
            offset,
            field,
            needed,
            available,
        } => EventLogError::BadHeader {
            offset: size_offset,
            detail: format!(
                "eventSize too small: {field} at byte {} needs {needed} bytes, {available} left in the header event",
                base + offset
            ),
        },
        other => other,
    }
}

fn parse_event2(
    r: &mut LeReader<'_>,
    index: u32,
    algorithms: &[LogAlgorithm],
) -> Result<Event, EventLogError> {
    let offset = r.pos;
    let pcr = r.u32("pcrIndex")?;
    let event_type = r.u32("eventType")?;
    let count_offset = r.pos;
    let count = r.u32("digest count")?;
    if count as usize != algorithms.len() {
        return Err(EventLogError::DigestCount {
            offset: count_offset,
            index,
            count,
            expected: algorithms.len(),
        });
    }
    let mut digests: Vec<EventDigest> = Vec::with_capacity(algorithms.len());
    for _ in 0..count {
        let alg_offset = r.pos;
        let alg_id = r.u16("digest algorithmId")?;
        let Some(spec) = algorithms.iter().find(|a| a.alg_id == alg_id) else {
            return Err(EventLogError::UnknownAlgorithm {
                offset: alg_offset,
                index,
                alg_id,
            });
        };
        if digests.iter().any(|d| d.alg_id == alg_id) {
            return Err(EventLogError::DuplicateAlgorithm {
                offset: alg_offset,
                alg_id,
                place: "one event's digests",
            });
        }
        let digest = r.bytes(usize::from(spec.digest_size), "digest")?.to_vec();
        digests.push(EventDigest {
            alg_id,
            alg: spec.alg,
            digest,
        });
    }
    let size = r.u32("eventSize")?;
    let data_offset = r.pos;
    let data = r.bytes(size as usize, "event data")?.to_vec();
    Ok(Event {
        index,
        pcr,
        event_type,
        digests,
        data,
        offset,
        data_offset,
    })
}

impl EventLog {
    /// The banks this crate can replay, in header order.
    pub fn banks(&self) -> Vec<HashAlg> {
        self.algorithms.iter().filter_map(|a| a.alg).collect()
    }

    /// The locality from an EV_NO_ACTION "StartupLocality" event, which sets
    /// the last byte of PCR 0's reset value (H-CRTM / locality 3 startup).
    pub fn startup_locality(&self) -> Option<u8> {
        self.events
            .iter()
            .filter(|e| e.event_type == EV_NO_ACTION && e.pcr == 0)
            .find_map(|e| match e.data.get(..16) {
                Some(sig) if sig == STARTUP_LOCALITY_SIGNATURE => e.data.get(16).copied(),
                _ => None,
            })
    }

    /// Replay every measured event: per bank, the final value of every PCR
    /// the log extends. PCRs start at zero (PCR 0 at the startup locality);
    /// EV_NO_ACTION events are not extended.
    pub fn replay(&self) -> PcrBanks {
        self.replay_tracked()
            .into_iter()
            .map(|(bank, pcrs)| (bank, pcrs.into_iter().map(|(i, (v, _))| (i, v)).collect()))
            .collect()
    }

    /// Like `replay`, also giving the index of the last event into each PCR.
    pub fn replay_tracked(&self) -> BTreeMap<HashAlg, BTreeMap<u32, (Vec<u8>, u32)>> {
        let locality = self.startup_locality().unwrap_or(0);
        let mut out: BTreeMap<HashAlg, BTreeMap<u32, (Vec<u8>, u32)>> = BTreeMap::new();
        for bank in self.banks() {
            out.insert(bank, BTreeMap::new());
        }
        for event in self.events.iter().filter(|e| e.event_type != EV_NO_ACTION) {
            for d in &event.digests {
                let Some(bank) = d.alg else { continue };
                let Some(pcrs) = out.get_mut(&bank) else {
                    continue;
                };
                let entry = pcrs.entry(event.pcr).or_insert_with(|| {
                    let mut init = vec![0u8; bank.digest_len()];
                    if event.pcr == 0 {
                        if let Some(last) = init.last_mut() {
                            *last = locality;
                        }
                    }
                    (init, event.index)
                });
                entry.0 = bank.hash(&[&entry.0, &d.digest]);
                entry.1 = event.index;
            }
        }
        out
    }
}

/// Check that the log replays, in `bank`, to the quoted value of every PCR
/// the log extends. A PCR the log extends but the quote leaves out is a
/// mismatch: its events would be unauthenticated. Quoted PCRs the log does
/// not touch (IMA's PCR 10, for example) are not checked here.
pub fn check_against_quote(
    log: &EventLog,
    bank: HashAlg,
    quoted: &BTreeMap<u32, Vec<u8>>,
) -> Result<(), ReplayMismatch> {
    let mut replay = log.replay_tracked();
    let Some(pcrs) = replay.remove(&bank) else {
        return Err(ReplayMismatch::BankNotInLog { bank });
    };
    for (pcr, (replayed, last_event)) in pcrs {
        match quoted.get(&pcr) {
            None => {
                return Err(ReplayMismatch::NotQuoted {
                    bank,
                    pcr,
                    replayed,
                    last_event,
                })
            }
            Some(q) if *q != replayed => {
                return Err(ReplayMismatch::Differs {
                    bank,
                    pcr,
                    quoted: q.clone(),
                    replayed,
                    last_event,
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

pub fn event_type_name(event_type: u32) -> &'static str {
    match event_type {
        EV_PREBOOT_CERT => "EV_PREBOOT_CERT",
        EV_POST_CODE => "EV_POST_CODE",
        0x2 => "EV_UNUSED",
        EV_NO_ACTION => "EV_NO_ACTION",
        EV_SEPARATOR => "EV_SEPARATOR",
        EV_ACTION => "EV_ACTION",
        EV_EVENT_TAG => "EV_EVENT_TAG",
        EV_S_CRTM_CONTENTS => "EV_S_CRTM_CONTENTS",
        EV_S_CRTM_VERSION => "EV_S_CRTM_VERSION",
        EV_CPU_MICROCODE => "EV_CPU_MICROCODE",
        EV_PLATFORM_CONFIG_FLAGS => "EV_PLATFORM_CONFIG_FLAGS",
        EV_TABLE_OF_DEVICES => "EV_TABLE_OF_DEVICES",
        EV_COMPACT_HASH => "EV_COMPACT_HASH",
        EV_IPL => "EV_IPL",
        EV_IPL_PARTITION_DATA => "EV_IPL_PARTITION_DATA",
        EV_NONHOST_CODE => "EV_NONHOST_CODE",
        EV_NONHOST_CONFIG => "EV_NONHOST_CONFIG",
        EV_NONHOST_INFO => "EV_NONHOST_INFO",
        EV_OMIT_BOOT_DEVICE_EVENTS => "EV_OMIT_BOOT_DEVICE_EVENTS",
        EV_EFI_VARIABLE_DRIVER_CONFIG => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        EV_EFI_VARIABLE_BOOT => "EV_EFI_VARIABLE_BOOT",
        EV_EFI_BOOT_SERVICES_APPLICATION => "EV_EFI_BOOT_SERVICES_APPLICATION",
        EV_EFI_BOOT_SERVICES_DRIVER => "EV_EFI_BOOT_SERVICES_DRIVER",
        EV_EFI_RUNTIME_SERVICES_DRIVER => "EV_EFI_RUNTIME_SERVICES_DRIVER",
        EV_EFI_GPT_EVENT => "EV_EFI_GPT_EVENT",
        EV_EFI_ACTION => "EV_EFI_ACTION",
        EV_EFI_PLATFORM_FIRMWARE_BLOB => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        EV_EFI_HANDOFF_TABLES => "EV_EFI_HANDOFF_TABLES",
        EV_EFI_PLATFORM_FIRMWARE_BLOB2 => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        EV_EFI_HANDOFF_TABLES2 => "EV_EFI_HANDOFF_TABLES2",
        EV_EFI_VARIABLE_BOOT2 => "EV_EFI_VARIABLE_BOOT2",
        EV_EFI_HCRTM_EVENT => "EV_EFI_HCRTM_EVENT",
        EV_EFI_VARIABLE_AUTHORITY => "EV_EFI_VARIABLE_AUTHORITY",
        EV_EFI_SPDM_FIRMWARE_BLOB => "EV_EFI_SPDM_FIRMWARE_BLOB",
        EV_EFI_SPDM_FIRMWARE_CONFIG => "EV_EFI_SPDM_FIRMWARE_CONFIG",
        _ => "unknown",
    }
}

// ---- typed event data ----

/// Format an EFI_GUID (first three fields little-endian) the usual way.
pub fn format_guid(g: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

fn event_reader(event: &Event) -> LeReader<'_> {
    LeReader {
        buf: &event.data,
        pos: 0,
    }
}

fn data_error(event: &Event, structure: &'static str, e: EventLogError) -> EventLogError {
    let (rel, detail) = match e {
        EventLogError::Truncated {
            offset,
            field,
            needed,
            available,
        } => (
            offset,
            format!("{field} needs {needed} bytes, {available} left"),
        ),
        other => (other.offset(), other.to_string()),
    };
    EventLogError::BadEventData {
        offset: event.data_offset.saturating_add(rel),
        index: event.index,
        structure,
        detail,
    }
}

/// UEFI_VARIABLE_DATA, the event data of EV_EFI_VARIABLE_* events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiVariable {
    pub guid: String,
    pub name: String,
    pub data: Vec<u8>,
}

pub fn parse_uefi_variable(event: &Event) -> Result<UefiVariable, EventLogError> {
    const S: &str = "UEFI_VARIABLE_DATA";
    let mut r = event_reader(event);
    let inner = |r: &mut LeReader<'_>| -> Result<UefiVariable, EventLogError> {
        let guid = format_guid(&r.array::<16>("VariableName")?);
        let name_chars = r.u64("UnicodeNameLength")?;
        let data_len = r.u64("VariableDataLength")?;
        // Lengths beyond the event data fail in `bytes`, before any copy.
        let name_bytes = usize::try_from(name_chars)
            .ok()
            .and_then(|n| n.checked_mul(2))
            .unwrap_or(usize::MAX);
        let name_raw = r.bytes(name_bytes, "UnicodeName")?;
        let data = r
            .bytes(
                usize::try_from(data_len).unwrap_or(usize::MAX),
                "VariableData",
            )?
            .to_vec();
        Ok(UefiVariable {
            guid,
            name: utf16le(name_raw),
            data,
        })
    };
    inner(&mut r).map_err(|e| data_error(event, S, e))
}

fn utf16le(raw: &[u8]) -> String {
    let units = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect::<String>()
        .trim_end_matches('\0')
        .to_string()
}

/// One entry of an EFI_SIGNATURE_LIST (db, dbx, KEK, PK contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureEntry {
    /// SignatureType GUID (EFI_CERT_X509, EFI_CERT_SHA256, ...).
    pub signature_type: String,
    pub owner: String,
    pub data: Vec<u8>,
}

/// Parse a sequence of EFI_SIGNATURE_LISTs (a db/dbx/KEK/PK variable's
/// value). `event` locates errors; `value` is the variable data.
pub fn parse_signature_lists(
    event: &Event,
    value: &[u8],
) -> Result<Vec<SignatureEntry>, EventLogError> {
    const S: &str = "EFI_SIGNATURE_LIST";
    // Offsets in errors are relative to the variable data, which ends the
    // event data.
    let value_base = event.data.len().saturating_sub(value.len());
    let mut r = LeReader { buf: value, pos: 0 };
    let mut out = Vec::new();
    let fail = |rel: usize, detail: String| EventLogError::BadEventData {
        offset: event.data_offset + value_base + rel,
        index: event.index,
        structure: S,
        detail,
    };
    while r.remaining() > 0 {
        let list_start = r.pos;
        let mut header = || -> Result<([u8; 16], u32, u32, u32), EventLogError> {
            Ok((
                r.array::<16>("SignatureType")?,
                r.u32("SignatureListSize")?,
                r.u32("SignatureHeaderSize")?,
                r.u32("SignatureSize")?,
            ))
        };
        let (sig_type, list_size, header_size, sig_size) =
            header().map_err(|e| fail(e.offset(), e.to_string()))?;
        let body = (list_size as usize)
            .checked_sub(28)
            .and_then(|b| b.checked_sub(header_size as usize));
        let Some(body) = body else {
            return Err(fail(
                list_start,
                format!("SignatureListSize {list_size} smaller than its header"),
            ));
        };
        if sig_size < 16 || body % sig_size as usize != 0 {
            return Err(fail(
                list_start,
                format!("SignatureSize {sig_size} does not divide the list body of {body} bytes"),
            ));
        }
        r.bytes(header_size as usize, "SignatureHeader")
            .map_err(|e| fail(e.offset(), e.to_string()))?;
        let signature_type = format_guid(&sig_type);
        for _ in 0..body / sig_size as usize {
            let entry = r
                .bytes(sig_size as usize, "EFI_SIGNATURE_DATA")
                .map_err(|e| fail(e.offset(), e.to_string()))?;
            let (owner, data) = entry.split_at(16);
            let mut g = [0u8; 16];
            g.copy_from_slice(owner);
            out.push(SignatureEntry {
                signature_type: signature_type.clone(),
                owner: format_guid(&g),
                data: data.to_vec(),
            });
        }
    }
    Ok(out)
}

/// The file path(s) in a UEFI_IMAGE_LOAD_EVENT's device path (event data of
/// EV_EFI_BOOT_SERVICES_APPLICATION/DRIVER), for messages. `None` when the
/// event has no readable file path node.
pub fn image_load_path(event: &Event) -> Option<String> {
    let mut r = event_reader(event);
    // ImageLocationInMemory, ImageLengthInMemory, ImageLinkTimeAddress.
    r.bytes(24, "image addresses").ok()?;
    let len = usize::try_from(r.u64("LengthOfDevicePath").ok()?).ok()?;
    let path = r.bytes(len, "DevicePath").ok()?;
    let mut p = LeReader { buf: path, pos: 0 };
    let mut parts = Vec::new();
    while p.remaining() >= 4 {
        let node_type = p.u8("Type").ok()?;
        let sub_type = p.u8("SubType").ok()?;
        let node_len = usize::from(p.u16("Length").ok()?);
        let body = p.bytes(node_len.checked_sub(4)?, "node").ok()?;
        // Media device path (4), file path node (4).
        if node_type == 4 && sub_type == 4 {
            parts.push(utf16le(body));
        }
        if node_type == 0x7f {
            break;
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

/// The text of an EV_IPL / EV_EFI_ACTION event (trailing NULs removed), if
/// it is UTF-8.
pub fn event_text(event: &Event) -> Option<&str> {
    let end = event
        .data
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i + 1);
    std::str::from_utf8(event.data.get(..end)?).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/eventlog")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    const GOOD: &[&str] = &[
        "create-mb-policy",
        "create-mb-policy-secureboot",
        "mb_log",
        "rust-keylime-uefi_log",
        // mb_log with SHA-1, SHA-384 and SHA-512 digests added (fixtures/README.md).
        "four-banks",
    ];

    /// Re-encode a parsed log (header bytes kept from the original).
    pub(crate) fn encode(log: &EventLog, original: &[u8]) -> Vec<u8> {
        let header_len = log.events.first().map_or(original.len(), |e| e.offset);
        let mut out = original[..header_len].to_vec();
        for e in &log.events {
            out.extend_from_slice(&e.pcr.to_le_bytes());
            out.extend_from_slice(&e.event_type.to_le_bytes());
            out.extend_from_slice(&(e.digests.len() as u32).to_le_bytes());
            for d in &e.digests {
                out.extend_from_slice(&d.alg_id.to_le_bytes());
                out.extend_from_slice(&d.digest);
            }
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.data);
        }
        out
    }

    fn oracle(name: &str) -> PcrBanks {
        let raw = fixture(&format!("{name}.pcrs.json"));
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        let mut out = PcrBanks::new();
        for (bank, pcrs) in v["pcrs"].as_object().unwrap() {
            let bank = HashAlg::parse(bank).unwrap();
            let m = out.entry(bank).or_default();
            for (i, hexv) in pcrs.as_object().unwrap() {
                m.insert(
                    i.parse().unwrap(),
                    hex::decode(hexv.as_str().unwrap()).unwrap(),
                );
            }
        }
        out
    }

    /// What tpm2-tools 5.4's tpm2_eventlog computes: it extends EV_NO_ACTION
    /// events too and ignores StartupLocality (tpm2-tools issues #3224 and
    /// #3146, fixed after 5.4). Used only to explain the oracle's PCR 0.
    fn replay_like_tpm2_tools_5_4(log: &EventLog, bank: HashAlg, pcr: u32) -> Vec<u8> {
        let mut v = vec![0u8; bank.digest_len()];
        for e in log.events.iter().filter(|e| e.pcr == pcr) {
            v = bank.hash(&[&v, e.digest(bank).unwrap()]);
        }
        v
    }

    #[test]
    fn replay_equals_tpm2_eventlog_oracle_on_every_log() {
        let mut deviations = 0;
        for name in GOOD {
            let log = parse(&fixture(&format!("{name}.bin"))).unwrap();
            let ours = log.replay();
            let theirs = oracle(name);
            assert!(!theirs.is_empty(), "{name}: empty oracle");
            assert_eq!(
                ours.iter()
                    .map(|(b, p)| (*b, p.keys().copied().collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
                theirs
                    .iter()
                    .map(|(b, p)| (*b, p.keys().copied().collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
                "{name}: banks and PCRs differ"
            );
            for (bank, pcrs) in &theirs {
                for (pcr, value) in pcrs {
                    let no_action_in_pcr = log
                        .events
                        .iter()
                        .any(|e| e.pcr == *pcr && e.event_type == EV_NO_ACTION);
                    if no_action_in_pcr {
                        // The oracle is tpm2-tools 5.4: it must equal its
                        // known-buggy replay, and ours must differ from it.
                        assert_eq!(
                            *value,
                            replay_like_tpm2_tools_5_4(&log, *bank, *pcr),
                            "{name} {bank} {pcr}"
                        );
                        assert_ne!(ours[bank][pcr], *value, "{name} {bank} {pcr}");
                        deviations += 1;
                    } else {
                        assert_eq!(
                            ours[bank][pcr], *value,
                            "{name}: {bank} PCR {pcr} differs from tpm2_eventlog"
                        );
                    }
                }
            }
            // The replay checks against itself as a quote, in every bank.
            for (bank, pcrs) in &ours {
                check_against_quote(&log, *bank, pcrs).unwrap();
            }
        }
        // Only PCR 0 of the one log with a StartupLocality event, both banks.
        assert_eq!(deviations, 2);
    }

    #[test]
    fn pcr0_with_startup_locality_3_follows_the_spec() {
        // Computed independently: PCR 0 reset value 00..03, EV_NO_ACTION
        // events skipped, then every PCR 0 digest extended.
        let log = parse(&fixture("create-mb-policy.bin")).unwrap();
        assert_eq!(
            hex::encode(&log.replay()[&HashAlg::Sha256][&0]),
            "0ee9a7feba8f4172f1a7451594aa5731665a4d353ac61814042ce107a00742f2"
        );
    }

    #[test]
    fn event_counts_and_banks() {
        let expect = [
            (
                "create-mb-policy",
                120,
                vec![HashAlg::Sha1, HashAlg::Sha256],
            ),
            ("create-mb-policy-secureboot", 98, vec![HashAlg::Sha256]),
            ("mb_log", 101, vec![HashAlg::Sha256]),
            ("rust-keylime-uefi_log", 123, vec![HashAlg::Sha256]),
            (
                "four-banks",
                101,
                vec![
                    HashAlg::Sha1,
                    HashAlg::Sha256,
                    HashAlg::Sha384,
                    HashAlg::Sha512,
                ],
            ),
        ];
        for (name, n, banks) in expect {
            let log = parse(&fixture(&format!("{name}.bin"))).unwrap();
            // The Spec ID header is not in `events`.
            assert_eq!(log.events.len(), n, "{name}");
            assert_eq!(log.events.first().unwrap().index, 1);
            assert_eq!(log.banks(), banks, "{name}");
        }
    }

    #[test]
    fn four_banks_replay_like_their_source_in_sha256() {
        // The SHA-256 bank of the derived log is mb_log's, event for event.
        let four = parse(&fixture("four-banks.bin")).unwrap().replay();
        let one = parse(&fixture("mb_log.bin")).unwrap().replay();
        assert_eq!(four[&HashAlg::Sha256], one[&HashAlg::Sha256]);
        for bank in [HashAlg::Sha384, HashAlg::Sha512] {
            let pcrs = &four[&bank];
            assert_eq!(pcrs.len(), one[&HashAlg::Sha256].len(), "{bank}");
            assert!(
                pcrs.values().all(|v| v.len() == bank.digest_len()),
                "{bank}"
            );
        }
    }

    #[test]
    fn startup_locality_sets_pcr0_reset_value() {
        let bytes = fixture("create-mb-policy.bin");
        let mut log = parse(&bytes).unwrap();
        assert_eq!(log.startup_locality(), Some(3));
        let with = log.replay();
        // Without the locality event PCR 0 must come out different (and
        // equal to a replay from all zeros).
        log.events
            .retain(|e| !(e.event_type == EV_NO_ACTION && e.data.starts_with(b"StartupLocality")));
        assert_eq!(log.startup_locality(), None);
        let without = log.replay();
        assert_ne!(with[&HashAlg::Sha256][&0], without[&HashAlg::Sha256][&0]);
        assert_eq!(with[&HashAlg::Sha256][&7], without[&HashAlg::Sha256][&7]);
        let mut pcr0 = vec![0u8; 32];
        for e in log
            .events
            .iter()
            .filter(|e| e.pcr == 0 && e.event_type != EV_NO_ACTION)
        {
            pcr0 = HashAlg::Sha256.hash(&[&pcr0, e.digest(HashAlg::Sha256).unwrap()]);
        }
        assert_eq!(without[&HashAlg::Sha256][&0], pcr0);
    }

    #[test]
    fn quote_mismatch_names_pcr_and_last_event() {
        let log = parse(&fixture("create-mb-policy.bin")).unwrap();
        let mut quoted = log.replay().remove(&HashAlg::Sha256).unwrap();
        quoted.get_mut(&4).unwrap()[0] ^= 1;
        let err = check_against_quote(&log, HashAlg::Sha256, &quoted).unwrap_err();
        let last4 = log
            .events
            .iter()
            .rfind(|e| e.pcr == 4 && e.event_type != EV_NO_ACTION)
            .unwrap()
            .index;
        match &err {
            ReplayMismatch::Differs {
                pcr,
                last_event,
                quoted: q,
                replayed,
                ..
            } => {
                assert_eq!(*pcr, 4);
                assert_eq!(*last_event, last4);
                assert_ne!(q, replayed);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(err.code(), "eventlog_replay_mismatch");
        quoted.remove(&4);
        let err = check_against_quote(&log, HashAlg::Sha256, &quoted).unwrap_err();
        assert!(
            matches!(err, ReplayMismatch::NotQuoted { pcr: 4, .. }),
            "{err:?}"
        );
        let err = check_against_quote(&log, HashAlg::Sha384, &quoted).unwrap_err();
        assert_eq!(err.code(), "eventlog_bank_missing");
    }

    #[test]
    fn bogus_and_empty_logs_refused() {
        let e = parse(&fixture("create-mb-policy-empty.bin")).unwrap_err();
        assert_eq!(e.code(), "eventlog_empty");
        let e = parse(&fixture("create-mb-policy-bogus.bin")).unwrap_err();
        // 34 bytes of text: its first fields are no EV_NO_ACTION in PCR 0.
        assert_eq!((e.code(), e.offset()), ("eventlog_bad_header", 0), "{e}");
    }

    #[test]
    fn every_prefix_errors_or_ends_at_an_event_boundary() {
        let bytes = fixture("create-mb-policy.bin");
        let full = parse(&bytes).unwrap();
        let boundaries: std::collections::BTreeMap<usize, usize> = full
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.offset, i))
            .collect();
        for len in 0..bytes.len() {
            match parse(&bytes[..len]) {
                Ok(log) => {
                    // Only a cut exactly before an event parses, and then to
                    // exactly the events before the cut.
                    let n = *boundaries
                        .get(&len)
                        .unwrap_or_else(|| panic!("prefix {len} parsed"));
                    assert_eq!(log.events.len(), n, "prefix {len}");
                    assert_eq!(log.events[..], full.events[..n]);
                }
                Err(e) => {
                    assert!(
                        !boundaries.contains_key(&len) || len == 0,
                        "prefix {len}: {e}"
                    );
                    assert!(
                        e.offset() <= len,
                        "prefix {len}: offset {} in {e}",
                        e.offset()
                    );
                    if len > 0 {
                        assert_eq!(e.code(), "eventlog_truncated", "prefix {len}: {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn huge_sizes_error_quickly_with_offsets() {
        let bytes = fixture("create-mb-policy.bin");
        // Header eventSize (offset 28) claims 4 GiB.
        let mut b = bytes.clone();
        b[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        let t = std::time::Instant::now();
        let e = parse(&b).unwrap_err();
        assert!(t.elapsed() < std::time::Duration::from_millis(50));
        assert_eq!((e.code(), e.offset()), ("eventlog_truncated", 32), "{e}");
        // Third event's eventSize claims 4 GiB.
        let log = parse(&bytes).unwrap();
        let ev = &log.events[2];
        let size_off = ev.data_offset - 4;
        let mut b = bytes.clone();
        b[size_off..size_off + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let e = parse(&b).unwrap_err();
        assert_eq!(
            (e.code(), e.offset()),
            ("eventlog_truncated", ev.data_offset),
            "{e}"
        );
        assert!(e.to_string().contains("4294967280"), "{e}");
        // numberOfAlgorithms in the header claims 2^32-1 entries.
        let mut b = bytes.clone();
        b[32 + 24..32 + 28].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = parse(&b).unwrap_err();
        assert_eq!(e.code(), "eventlog_truncated", "{e}");
    }

    #[test]
    fn unknown_algorithm_and_digest_count_errors() {
        let bytes = fixture("create-mb-policy.bin");
        let log = parse(&bytes).unwrap();
        let ev = &log.events[5];
        // First digest's algorithm id (after pcr, type, count).
        let alg_off = ev.offset + 12;
        let mut b = bytes.clone();
        b[alg_off..alg_off + 2].copy_from_slice(&0x0012u16.to_le_bytes());
        let e = parse(&b).unwrap_err();
        assert_eq!(
            e,
            EventLogError::UnknownAlgorithm {
                offset: alg_off,
                index: 6,
                alg_id: 0x0012
            }
        );
        assert_eq!(e.code(), "eventlog_unknown_algorithm");
        // Digest count 1 where the header lists two algorithms.
        let mut b = bytes.clone();
        b[ev.offset + 8..ev.offset + 12].copy_from_slice(&1u32.to_le_bytes());
        let e = parse(&b).unwrap_err();
        assert_eq!(
            e,
            EventLogError::DigestCount {
                offset: ev.offset + 8,
                index: 6,
                count: 1,
                expected: 2
            }
        );
        // Same algorithm twice in one event.
        let mut b = bytes.clone();
        let second = alg_off + 2 + 20;
        b[second..second + 2].copy_from_slice(&0x0004u16.to_le_bytes());
        let e = parse(&b).unwrap_err();
        assert_eq!(e.code(), "eventlog_duplicate_algorithm");
        assert_eq!(e.offset(), second);
        // Header gives SHA-256 a 20-byte digest.
        let mut b = bytes.clone();
        let sha256_size = 32 + 28 + 4 + 2;
        b[sha256_size..sha256_size + 2].copy_from_slice(&20u16.to_le_bytes());
        let e = parse(&b).unwrap_err();
        assert_eq!(e.code(), "eventlog_bad_digest_size");
        // SHA-1-only log.
        let mut b = bytes.clone();
        b[32..48].copy_from_slice(b"Spec ID Event00\0");
        assert_eq!(parse(&b).unwrap_err().code(), "eventlog_not_crypto_agile");
    }

    #[test]
    fn encode_round_trips() {
        for name in GOOD {
            let bytes = fixture(&format!("{name}.bin"));
            let log = parse(&bytes).unwrap();
            assert_eq!(encode(&log, &bytes), bytes, "{name}");
        }
    }

    #[test]
    fn typed_event_data() {
        let log = parse(&fixture("create-mb-policy-secureboot.bin")).unwrap();
        let vars: Vec<UefiVariable> = log
            .events
            .iter()
            .filter(|e| e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG)
            .map(|e| parse_uefi_variable(e).unwrap())
            .collect();
        let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["SecureBoot", "PK", "KEK", "db", "dbx"]);
        assert_eq!(vars[0].data, [1]);
        assert_eq!(vars[0].guid, EFI_GLOBAL_VARIABLE);
        let pk_event = log
            .events
            .iter()
            .find(|e| {
                e.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG
                    && parse_uefi_variable(e).unwrap().name == "PK"
            })
            .unwrap();
        let pk = parse_signature_lists(pk_event, &vars[1].data).unwrap();
        assert_eq!(pk.len(), 1);
        assert_eq!(pk[0].signature_type, EFI_CERT_X509);
        // A DER certificate: SEQUENCE with a two-byte length.
        assert_eq!(&pk[0].data[..2], &[0x30, 0x82]);
        let apps: Vec<String> = log
            .events
            .iter()
            .filter(|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
            .filter_map(image_load_path)
            .collect();
        assert!(
            apps.iter().any(|p| p.to_ascii_lowercase().contains("shim")),
            "{apps:?}"
        );
        // Malformed variable data: a name length past the end.
        let mut bad = pk_event.clone();
        bad.data[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = parse_uefi_variable(&bad).unwrap_err();
        assert_eq!(e.code(), "eventlog_bad_event_data");
        assert_eq!(e.offset(), bad.data_offset + 32);
    }
}
