//! Whitelist policy as the admin API speaks it: named, versioned whitelists
//! made of parts, host groups with a match policy per part, golden-host
//! import, dry-run reports, and the pure helpers around them (validation,
//! diff, Keylime `tpm_policy` import). Documented in `docs/policy.md`.

use crate::tpm::{HashAlg, MAX_PCR};
use crate::wire::{PcrWhitelist, Reason, Trust};
use chrono::{DateTime, Utc};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

/// Conventional part names (operators may add their own).
pub const PART_PLATFORM: &str = "platform";
pub const PART_OS: &str = "os";
pub const PART_VMM: &str = "vmm";
pub const PART_HOST_UNIQUE: &str = "host_unique";
pub const PART_RUNTIME: &str = "runtime";

/// Longest whitelist, group or part name.
pub const MAX_NAME_LEN: usize = 64;

/// The PCRs a golden-host import takes for a conventional part when the
/// admin names none: firmware 0–7, boot loader and kernel 8–9 (grub), IMA 10.
pub fn default_pcrs(part: &str) -> Option<&'static [u8]> {
    match part {
        PART_PLATFORM => Some(&[0, 1, 2, 3, 4, 5, 6, 7]),
        PART_OS => Some(&[8, 9]),
        PART_RUNTIME => Some(&[10]),
        _ => None,
    }
}

/// The acceptable values of one part: any listed value of a PCR passes, so
/// old and new firmware can both pass during a rolling upgrade. A part may
/// also judge the host's event logs: `boot` the UEFI log (event by event,
/// see `docs/eventlog.md`), `runtime` the IMA list (file by file, see
/// `docs/ima.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Part {
    #[serde(default, deserialize_with = "unique_pcrs")]
    pub pcrs: PcrWhitelist,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Boxed: a boot policy is ~450 bytes inline, and every whitelist's
    /// parts map allocates room for eleven parts at once.
    pub boot: Option<Box<crate::bootpolicy::BootPolicy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<crate::runtime_policy::RuntimePolicy>,
}

impl Part {
    /// A part of PCR values only.
    pub fn of_pcrs(pcrs: PcrWhitelist) -> Self {
        Part {
            pcrs,
            ..Part::default()
        }
    }

    /// True when the part judges nothing: no PCR, no boot or runtime policy.
    pub fn is_empty(&self) -> bool {
        self.pcrs.values().all(BTreeMap::is_empty) && self.boot.is_none() && self.runtime.is_none()
    }
}

pub type Parts = BTreeMap<String, Part>;

/// `POST /v1/whitelists` (create) and `PUT /v1/whitelists/{name}` (new version).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WhitelistSpec {
    /// Required on create; on update it must be absent or equal the path's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(deserialize_with = "unique_map")]
    pub parts: Parts,
    /// On update: the version this edit was made from. The update is refused
    /// (409 `version_conflict`) if another admin made a newer one meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u32>,
}

/// One stored version of a whitelist (also the export file format).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WhitelistVersion {
    pub name: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(deserialize_with = "unique_map")]
    pub parts: Parts,
    /// True for the version that deleted the whitelist.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    pub created_at: DateTime<Utc>,
    /// The admin certificate's identity that made this version.
    pub created_by: String,
}

/// `GET /v1/whitelists` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WhitelistSummary {
    pub name: String,
    pub version: u32,
    pub deleted: bool,
    pub parts: Vec<String>,
    pub groups: Vec<String>,
}

/// How a group judges one part.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MatchPolicy {
    /// The group's whitelists must define the part, and the host must match it.
    Required,
    /// Judged only where one of the group's whitelists defines the part.
    #[default]
    RequiredIfDefined,
}

/// `PUT /v1/groups/{name}` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whitelist names; each part passes if any of them that defines it matches.
    pub whitelists: Vec<String>,
    /// Match policy per part name; parts not named are `required_if_defined`.
    #[serde(default, deserialize_with = "unique_map")]
    pub match_policy: BTreeMap<String, MatchPolicy>,
    /// Absent to create; the current version to update (optimistic concurrency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u32>,
}

/// A host group as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub whitelists: Vec<String>,
    #[serde(default)]
    pub match_policy: BTreeMap<String, MatchPolicy>,
    pub updated_at: DateTime<Utc>,
    /// Member hosts (filled in by `GET /v1/groups/{name}`).
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// `POST /v1/groups/{name}/hosts`: move hosts into or out of a group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `POST /v1/whitelists/{name}/golden`: make a new version from the PCR
/// values that a currently attesting host reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GoldenImport {
    pub host: String,
    pub part: String,
    /// Which PCRs; default by part (`platform` 0–7, `os` 8–9, `runtime` 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcrs: Option<Vec<u8>>,
    /// Which banks; default every bank the host reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub banks: Option<Vec<HashAlg>>,
    /// Replace the part's values instead of adding the host's as more acceptable ones.
    #[serde(default)]
    pub replace: bool,
    /// The version this import builds on; absent creates the whitelist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u32>,
}

/// The whitelist versions a verdict was judged against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct WhitelistRef {
    pub name: String,
    pub version: u32,
}

impl fmt::Display for WhitelistRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PartOutcome {
    Pass,
    Fail,
    /// Required by the group's match policy but defined by none of its whitelists.
    Missing,
}

/// How one part fared.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartResult {
    pub part: String,
    pub outcome: PartOutcome,
    /// The whitelist version that passed the part, or the closest one that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitelist: Option<WhitelistRef>,
    /// PCRs the part judged.
    pub pcrs_checked: usize,
}

/// The policy a verdict was judged against, part by part.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct AppliedPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub whitelists: Vec<WhitelistRef>,
    pub parts: Vec<PartResult>,
}

/// A host whose verdict a policy change would change (or did).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VerdictChange {
    pub host: String,
    pub before: Trust,
    pub after: Trust,
    /// Why the host is untrusted afterwards (empty when trusted).
    pub reasons: Vec<Reason>,
}

/// Answer of every policy change, and of its `?dry_run=true` form.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChangeReport {
    /// False for a dry run: nothing was stored.
    pub applied: bool,
    /// What was (or would be) changed, e.g. `whitelist fleet@4`.
    pub change: String,
    /// The whitelist version made, when the change made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitelist: Option<WhitelistVersion>,
    /// The group as it is (or would be) after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Group>,
    /// Changes of acceptable values, for a whitelist change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<DiffEntry>,
    /// Hosts with genuine evidence judged again.
    pub hosts_judged: usize,
    /// The hosts whose trust changes (or would change), with why.
    pub changed: Vec<VerdictChange>,
}

/// One difference between two versions of a whitelist: the acceptable
/// values of one PCR (`bank`, `pcr`), or one field of a part's boot or
/// runtime policy (`policy`, `pointer`: an RFC 6901 JSON pointer into that
/// policy's JSON, e.g. `/digests/~1usr~1bin~1bash`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiffEntry {
    pub part: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bank: Option<HashAlg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcr: Option<u8>,
    /// `boot` or `runtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Why a whitelist, group or import is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("name {name:?} is invalid: use 1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.'")]
    Name { name: String },
    #[error("part {part}: PCR index {index} is outside 0-{MAX_PCR}")]
    PcrIndex { part: String, index: u8 },
    #[error("part {part}: PCR {index} ({bank}) lists no acceptable value")]
    NoValues {
        part: String,
        bank: HashAlg,
        index: u8,
    },
    #[error("part {part}: PCR {index} ({bank}): {value:?} is not a {len}-byte hex digest")]
    Digest {
        part: String,
        bank: HashAlg,
        index: u8,
        value: String,
        len: usize,
    },
    #[error("part {part}: PCR {index} ({bank}) lists {value} twice")]
    DuplicateValue {
        part: String,
        bank: HashAlg,
        index: u8,
        value: String,
    },
    #[error("whitelist {0:?} is listed twice")]
    DuplicateWhitelist(String),
    #[error("description is longer than 1024 characters")]
    Description,
    #[error("Keylime tpm_policy: {0}")]
    Keylime(String),
    #[error("part {part}: boot policy: {source}")]
    BootPolicy {
        part: String,
        source: crate::bootpolicy::BootPolicyError,
    },
    #[error("part {part}: runtime policy: {source}")]
    RuntimePolicy {
        part: String,
        source: crate::runtime_policy::PolicyError,
    },
}

impl PolicyError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::Name { .. } => "invalid_name",
            PolicyError::PcrIndex { .. } => "pcr_index_out_of_range",
            PolicyError::NoValues { .. } => "pcr_values_empty",
            PolicyError::Digest { .. } => "digest_malformed",
            PolicyError::DuplicateValue { .. } => "duplicate_value",
            PolicyError::DuplicateWhitelist(_) => "duplicate_name",
            PolicyError::Description => "description_too_long",
            PolicyError::Keylime(_) => "keylime_policy_malformed",
            PolicyError::BootPolicy { .. } => "boot_policy_invalid",
            PolicyError::RuntimePolicy { .. } => "runtime_policy_invalid",
        }
    }
}

/// Whitelist, group and part names: short, printable, no separators that
/// could be confused with our own `host:NAME` whitelists or URL paths.
pub fn valid_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(PolicyError::Name {
            name: name.chars().take(MAX_NAME_LEN + 8).collect(),
        })
    }
}

/// Check every part: names, PCR indices 0–23, hex digests of the bank's
/// length, at least one value per PCR, no value twice. Digests are
/// normalized to lower case so that comparison and diff are exact.
pub fn normalize_parts(parts: &mut Parts) -> Result<(), PolicyError> {
    for (part, p) in parts.iter_mut() {
        valid_name(part)?;
        if let Some(boot) = &p.boot {
            boot.validate().map_err(|source| PolicyError::BootPolicy {
                part: part.clone(),
                source,
            })?;
        }
        if let Some(runtime) = &p.runtime {
            runtime
                .validate()
                .map_err(|source| PolicyError::RuntimePolicy {
                    part: part.clone(),
                    source,
                })?;
        }
        for (bank, indices) in p.pcrs.iter_mut() {
            for (index, values) in indices.iter_mut() {
                if *index > MAX_PCR {
                    return Err(PolicyError::PcrIndex {
                        part: part.clone(),
                        index: *index,
                    });
                }
                if values.is_empty() {
                    return Err(PolicyError::NoValues {
                        part: part.clone(),
                        bank: *bank,
                        index: *index,
                    });
                }
                let mut seen = std::collections::BTreeSet::new();
                for v in values.iter_mut() {
                    let ok = v.len() == bank.digest_len() * 2
                        && v.bytes().all(|b| b.is_ascii_hexdigit());
                    if !ok {
                        return Err(PolicyError::Digest {
                            part: part.clone(),
                            bank: *bank,
                            index: *index,
                            value: v.chars().take(160).collect(),
                            len: bank.digest_len(),
                        });
                    }
                    v.make_ascii_lowercase();
                    if !seen.insert(v.clone()) {
                        return Err(PolicyError::DuplicateValue {
                            part: part.clone(),
                            bank: *bank,
                            index: *index,
                            value: v.clone(),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Validate a whitelist spec in place (see [`normalize_parts`]).
pub fn normalize_spec(spec: &mut WhitelistSpec) -> Result<(), PolicyError> {
    if let Some(n) = &spec.name {
        valid_name(n)?;
    }
    if spec.description.as_ref().is_some_and(|d| d.len() > 1024) {
        return Err(PolicyError::Description);
    }
    normalize_parts(&mut spec.parts)
}

/// Validate a group spec: names, no whitelist twice.
pub fn validate_group(spec: &GroupSpec) -> Result<(), PolicyError> {
    if spec.description.as_ref().is_some_and(|d| d.len() > 1024) {
        return Err(PolicyError::Description);
    }
    let mut seen = std::collections::BTreeSet::new();
    for w in &spec.whitelists {
        valid_name(w)?;
        if !seen.insert(w) {
            return Err(PolicyError::DuplicateWhitelist(w.clone()));
        }
    }
    for part in spec.match_policy.keys() {
        valid_name(part)?;
    }
    Ok(())
}

/// What differs between two versions' parts: PCR values in (part, bank,
/// PCR) order, then, per part, the fields of its boot and runtime policies
/// in JSON-pointer order. A list-valued field lists the values added and
/// removed; a scalar that changed lists its new and old value.
pub fn diff(from: &Parts, to: &Parts) -> Vec<DiffEntry> {
    let mut keys = std::collections::BTreeSet::new();
    for (parts, _) in [(from, 0), (to, 1)] {
        for (part, p) in parts {
            for (bank, indices) in &p.pcrs {
                for index in indices.keys() {
                    keys.insert((part.clone(), *bank, *index));
                }
            }
        }
    }
    let values = |parts: &Parts, part: &str, bank: HashAlg, index: u8| -> Vec<String> {
        parts
            .get(part)
            .and_then(|p| p.pcrs.get(&bank))
            .and_then(|b| b.get(&index))
            .cloned()
            .unwrap_or_default()
    };
    let mut out: Vec<DiffEntry> = keys
        .into_iter()
        .filter_map(|(part, bank, pcr)| {
            let (added, removed) = added_removed(
                &values(from, &part, bank, pcr),
                &values(to, &part, bank, pcr),
            );
            (!added.is_empty() || !removed.is_empty()).then_some(DiffEntry {
                part,
                bank: Some(bank),
                pcr: Some(pcr),
                policy: None,
                pointer: None,
                added,
                removed,
            })
        })
        .collect();
    let names: std::collections::BTreeSet<&String> = from.keys().chain(to.keys()).collect();
    for part in names {
        let (a, b) = (from.get(part), to.get(part));
        let boot = |p: Option<&Part>| p.and_then(|p| p.boot.as_ref()).map(serde_json::to_value);
        let runtime =
            |p: Option<&Part>| p.and_then(|p| p.runtime.as_ref()).map(serde_json::to_value);
        for (policy, old, new) in [
            ("boot", boot(a), boot(b)),
            ("runtime", runtime(a), runtime(b)),
        ] {
            // Our own policy types always serialize; a failure reads as absent.
            let old = json_leaves(old.and_then(Result::ok));
            let new = json_leaves(new.and_then(Result::ok));
            let pointers: std::collections::BTreeSet<&String> =
                old.keys().chain(new.keys()).collect();
            for pointer in pointers {
                let none = Vec::new();
                let (added, removed) = added_removed(
                    old.get(pointer).unwrap_or(&none),
                    new.get(pointer).unwrap_or(&none),
                );
                if added.is_empty() && removed.is_empty() {
                    continue;
                }
                out.push(DiffEntry {
                    part: part.clone(),
                    bank: None,
                    pcr: None,
                    policy: Some(policy.into()),
                    pointer: Some(pointer.clone()),
                    added,
                    removed,
                });
            }
        }
    }
    out
}

/// Values in `new` and not in `old`, and in `old` and not in `new`.
fn added_removed(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let old_set: std::collections::HashSet<&String> = old.iter().collect();
    let new_set: std::collections::HashSet<&String> = new.iter().collect();
    (
        new.iter()
            .filter(|v| !old_set.contains(v))
            .cloned()
            .collect(),
        old.iter()
            .filter(|v| !new_set.contains(v))
            .cloned()
            .collect(),
    )
}

/// A JSON value as JSON pointer -> the values there: an array of scalars is
/// one set of values, an array holding objects or arrays is a field per
/// index, a scalar is one value (strings bare, others as JSON).
fn json_leaves(v: Option<serde_json::Value>) -> BTreeMap<String, Vec<String>> {
    fn scalar(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    fn walk(v: &serde_json::Value, at: &mut String, out: &mut BTreeMap<String, Vec<String>>) {
        let len = at.len();
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map {
                    at.push('/');
                    at.push_str(&k.replace('~', "~0").replace('/', "~1"));
                    walk(child, at, out);
                    at.truncate(len);
                }
            }
            serde_json::Value::Array(items)
                if items.iter().all(|i| !i.is_object() && !i.is_array()) =>
            {
                out.insert(at.clone(), items.iter().map(scalar).collect());
            }
            serde_json::Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    at.push('/');
                    at.push_str(&i.to_string());
                    walk(child, at, out);
                    at.truncate(len);
                }
            }
            other => {
                out.insert(at.clone(), vec![scalar(other)]);
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Some(v) = v {
        walk(&v, &mut String::new(), &mut out);
    }
    out
}

/// Convert Keylime's `tpm_policy` JSON (`{"mask": "0x…", "15": ["hex", …],
/// "22": "hex"}`: PCR index → one acceptable value or a list of them) into
/// one part for `bank`. The mask, when present, must cover exactly the
/// listed PCRs, so a file that disagrees with itself is refused.
pub fn part_from_keylime_tpm_policy(json: &str, bank: HashAlg) -> Result<Part, PolicyError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| PolicyError::Keylime(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| PolicyError::Keylime("the policy is not a JSON object".into()))?;
    let mut pcrs = BTreeMap::new();
    let mut mask = None;
    for (key, v) in obj {
        if key == "mask" {
            let s = v
                .as_str()
                .ok_or_else(|| PolicyError::Keylime("mask is not a string".into()))?;
            let hex = s.trim_start_matches("0x").trim_start_matches("0X");
            mask = Some(
                u32::from_str_radix(hex, 16)
                    .map_err(|_| PolicyError::Keylime(format!("mask {s:?} is not hex")))?,
            );
            continue;
        }
        let index: u8 = key
            .parse()
            .map_err(|_| PolicyError::Keylime(format!("key {key:?} is not a PCR index")))?;
        let list: Vec<String> = match v {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_string).ok_or_else(|| {
                        PolicyError::Keylime(format!("PCR {index}: values must be hex strings"))
                    })
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(PolicyError::Keylime(format!(
                    "PCR {index}: expected a hex string or a list of them"
                )))
            }
        };
        let list = list
            .into_iter()
            .map(|s| s.trim_start_matches("0x").to_string())
            .collect();
        pcrs.insert(index, list);
    }
    if pcrs.is_empty() {
        return Err(PolicyError::Keylime("the policy lists no PCR".into()));
    }
    if let Some(mask) = mask {
        let listed = pcrs
            .keys()
            .filter(|i| **i <= MAX_PCR)
            .fold(0u32, |m, i| m | (1 << i));
        if listed != mask {
            return Err(PolicyError::Keylime(format!(
                "mask {mask:#x} does not match the listed PCRs ({listed:#x})"
            )));
        }
    }
    let mut parts = Parts::new();
    parts.insert(
        "keylime".into(),
        Part::of_pcrs(BTreeMap::from([(bank, pcrs)])),
    );
    normalize_parts(&mut parts)?;
    Ok(parts.remove("keylime").unwrap_or_default())
}

/// Deserialize a map refusing a key given twice: JSON objects with
/// duplicate keys would otherwise keep the last value silently.
pub fn unique_map<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Ord + fmt::Debug,
    V: Deserialize<'de>,
{
    struct Unique<K, V>(PhantomData<(K, V)>);
    impl<'de, K, V> Visitor<'de> for Unique<K, V>
    where
        K: Deserialize<'de> + Ord + fmt::Debug,
        V: Deserialize<'de>,
    {
        type Value = BTreeMap<K, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map without duplicate keys")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<K, V>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique(PhantomData))
}

/// [`unique_map`] two levels deep, for bank → PCR → values.
fn unique_pcrs<'de, D>(d: D) -> Result<PcrWhitelist, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Indices(#[serde(deserialize_with = "unique_map")] BTreeMap<u8, Vec<String>>);
    let banks: BTreeMap<HashAlg, Indices> = unique_map(d)?;
    Ok(banks.into_iter().map(|(b, i)| (b, i.0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex32(b: u8) -> String {
        hex::encode([b; 32])
    }

    fn part(index: u8, values: &[String]) -> Part {
        Part::of_pcrs(BTreeMap::from([(
            HashAlg::Sha256,
            BTreeMap::from([(index, values.to_vec())]),
        )]))
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let a = hex32(1);
        let dup_part = r#"{"parts":{"os":{},"os":{}}}"#;
        let e = serde_json::from_str::<WhitelistSpec>(dup_part).unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
        let dup_pcr = format!(r#"{{"pcrs":{{"sha256":{{"0":["{a}"],"0":["{a}"]}}}}}}"#);
        let e = serde_json::from_str::<Part>(&dup_pcr).unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
        let ok = format!(r#"{{"pcrs":{{"sha256":{{"0":["{a}"],"1":["{a}"]}}}}}}"#);
        assert_eq!(
            serde_json::from_str::<Part>(&ok).unwrap().pcrs[&HashAlg::Sha256].len(),
            2
        );
        let bad_bank = r#"{"pcrs":{"md5":{"0":["00"]}}}"#;
        assert!(serde_json::from_str::<Part>(bad_bank).is_err());
    }

    #[test]
    fn normalize_checks_every_rule() {
        let mut ok = Parts::from([("platform".to_string(), part(7, &[hex32(0xAB)]))]);
        normalize_parts(&mut ok).unwrap();
        assert_eq!(ok["platform"].pcrs[&HashAlg::Sha256][&7][0], hex32(0xab));

        let cases: Vec<(Parts, &str)> = vec![
            (
                Parts::from([("p".into(), part(24, &[hex32(1)]))]),
                "pcr_index_out_of_range",
            ),
            (
                Parts::from([("p".into(), part(0, &[]))]),
                "pcr_values_empty",
            ),
            (
                Parts::from([("p".into(), part(0, &["00".into()]))]),
                "digest_malformed",
            ),
            (
                Parts::from([("p".into(), part(0, &[hex::encode([1u8; 20])]))]),
                "digest_malformed",
            ),
            (
                Parts::from([("p".into(), part(0, &[hex32(1), hex32(1).to_uppercase()]))]),
                "duplicate_value",
            ),
            (
                Parts::from([("bad name".into(), part(0, &[hex32(1)]))]),
                "invalid_name",
            ),
        ];
        for (mut parts, code) in cases {
            assert_eq!(normalize_parts(&mut parts).unwrap_err().code(), code);
        }
    }

    #[test]
    fn boot_and_runtime_policies_are_validated() {
        let boot = |version: u32, cmdline: &str| serde_json::json!({"version": version, "bank": "sha256", "kernel_cmdline": [cmdline]});
        let ok: Part = serde_json::from_value(serde_json::json!({
            "boot": boot(1, "^/vmlinuz"),
            "runtime": {"digests": {"/usr/bin/x": ["sha256:".to_owned() + &hex32(1)]}}
        }))
        .unwrap();
        assert!(!ok.is_empty() && Part::default().is_empty());
        let mut parts = Parts::from([("os".to_string(), ok.clone())]);
        normalize_parts(&mut parts).unwrap();
        // Absent policies stay absent in JSON (old clients read new parts).
        let plain = serde_json::to_string(&part(0, &[hex32(1)])).unwrap();
        assert!(
            !plain.contains("boot") && !plain.contains("runtime"),
            "{plain}"
        );

        let mut bad_regex = ok.clone();
        bad_regex.boot = serde_json::from_value(boot(1, "(")).unwrap();
        let mut bad_version = ok.clone();
        bad_version.boot = serde_json::from_value(boot(9, "x")).unwrap();
        let mut bad_digest = ok.clone();
        bad_digest.runtime =
            serde_json::from_value(serde_json::json!({"digests": {"/usr/bin/x": ["sha256:00"]}}))
                .unwrap();
        for (p, code, text) in [
            (bad_regex, "boot_policy_invalid", "kernel_cmdline"),
            (bad_version, "boot_policy_invalid", "version 9"),
            (bad_digest, "runtime_policy_invalid", "/usr/bin/x"),
        ] {
            let mut parts = Parts::from([("os".to_string(), p)]);
            let e = normalize_parts(&mut parts).unwrap_err();
            assert_eq!(e.code(), code);
            assert!(
                e.to_string().contains("part os") && e.to_string().contains(text),
                "{e}"
            );
        }
        let unknown = serde_json::json!({"boot": {"version": 1, "bank": "sha256", "pcr99": 1}});
        assert!(serde_json::from_value::<Part>(unknown).is_err());
    }

    #[test]
    fn names_are_restricted() {
        assert!(valid_name("fleet-a_2.1").is_ok());
        for bad in ["", "host:x", "a/b", "-x", ".x", &"a".repeat(65)] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
        let g = GroupSpec {
            description: None,
            whitelists: vec!["a".into(), "a".into()],
            match_policy: BTreeMap::new(),
            base_version: None,
        };
        assert_eq!(validate_group(&g).unwrap_err().code(), "duplicate_name");
    }

    #[test]
    fn diff_lists_added_and_removed_values() {
        let v1 = Parts::from([("platform".into(), part(0, &[hex32(1)]))]);
        let v2 = Parts::from([
            ("platform".into(), part(0, &[hex32(1), hex32(2)])),
            ("os".into(), part(8, &[hex32(3)])),
        ]);
        let d = diff(&v1, &v2);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].part.as_str(), d[0].pcr), ("os", Some(8)));
        assert_eq!(d[0].added, vec![hex32(3)]);
        assert_eq!(
            (d[1].part.as_str(), d[1].added.clone()),
            ("platform", vec![hex32(2)])
        );
        assert!(d[1].removed.is_empty());
        let back = diff(&v2, &v1);
        assert_eq!(back[1].removed, vec![hex32(2)]);
        assert!(diff(&v1, &v1).is_empty());
    }

    #[test]
    fn diff_names_boot_and_runtime_policy_changes() {
        let runtime = |digests: serde_json::Value, violations: bool| -> Part {
            serde_json::from_value(serde_json::json!({
                "runtime": {"digests": digests, "excludes": ["/tmp/.*"], "allow_violations": violations}
            }))
            .unwrap()
        };
        let (a, b, c) = (
            format!("sha256:{}", hex32(1)),
            format!("sha256:{}", hex32(2)),
            format!("sha256:{}", hex32(3)),
        );
        let v1 = Parts::from([(
            "runtime".into(),
            runtime(
                serde_json::json!({"/usr/bin/bash": [a.clone()], "/usr/bin/old": [c.clone()]}),
                false,
            ),
        )]);
        let v2 = Parts::from([(
            "runtime".into(),
            runtime(
                serde_json::json!({"/usr/bin/bash": [a.clone(), b.clone()]}),
                true,
            ),
        )]);
        let d = diff(&v1, &v2);
        let view: Vec<(&str, Vec<String>, Vec<String>)> = d
            .iter()
            .map(|e| {
                assert_eq!(
                    (e.part.as_str(), e.policy.as_deref(), e.bank, e.pcr),
                    ("runtime", Some("runtime"), None, None)
                );
                (
                    e.pointer.as_deref().unwrap(),
                    e.added.clone(),
                    e.removed.clone(),
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                (
                    "/allow_violations",
                    vec!["true".to_string()],
                    vec!["false".to_string()]
                ),
                ("/digests/~1usr~1bin~1bash", vec![b.clone()], vec![]),
                ("/digests/~1usr~1bin~1old", vec![], vec![c.clone()]),
            ]
        );
        assert!(diff(&v2, &v2).is_empty());

        // A boot policy appearing is listed field by field.
        let mut v3 = v2.clone();
        if let Some(p) = v3.get_mut("runtime") {
            p.boot = serde_json::from_value(serde_json::json!({
                "version": 1, "bank": "sha256",
                "kernel_cmdline": ["^BOOT_IMAGE=/vmlinuz"]
            }))
            .unwrap();
        }
        let d = diff(&v2, &v3);
        assert!(!d.is_empty());
        assert!(d
            .iter()
            .all(|e| e.policy.as_deref() == Some("boot") && e.removed.is_empty()));
        assert!(d
            .iter()
            .any(|e| e.pointer.as_deref() == Some("/kernel_cmdline")
                && e.added == ["^BOOT_IMAGE=/vmlinuz"]));
    }

    #[test]
    fn keylime_tpm_policy_imports() {
        let a = hex32(0xaa);
        let b = hex32(0xbb);
        let json = format!(r#"{{"mask":"0x408000","15":["{a}","{b}"],"22":"{a}"}}"#);
        let p = part_from_keylime_tpm_policy(&json, HashAlg::Sha256).unwrap();
        let bank = &p.pcrs[&HashAlg::Sha256];
        assert_eq!(bank[&15], vec![a.clone(), b.clone()]);
        assert_eq!(bank[&22], vec![a.clone()]);

        let wrong_mask = format!(r#"{{"mask":"0x1","15":["{a}"]}}"#);
        assert!(part_from_keylime_tpm_policy(&wrong_mask, HashAlg::Sha256).is_err());
        let wrong_len = format!(r#"{{"15":["{a}"]}}"#);
        let e = part_from_keylime_tpm_policy(&wrong_len, HashAlg::Sha1).unwrap_err();
        assert_eq!(e.code(), "digest_malformed");
        for bad in ["[]", "{}", r#"{"x":"00"}"#, r#"{"1":5}"#, "not json"] {
            assert!(
                part_from_keylime_tpm_policy(bad, HashAlg::Sha256).is_err(),
                "{bad}"
            );
        }
    }
}
