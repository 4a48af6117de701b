//! The IMA runtime policy: which digests each path may have, which paths
//! are not judged (exclude regexes), and which keys may sign files
//! (`ima-sig`). Our JSON is [`PolicyDocument`]; Keylime's runtime-policy
//! JSON and flat allowlists (`digest  path`) are imported as they are.
//!
//! A [`RuntimePolicy`] compiles its document once (hash maps, one combined
//! regex, parsed keys) on first use; [`RuntimePolicy::validate`] forces that.

use crate::ima::{DigestBytes, EntryRef, FailureCode, Template};
use crate::HashAlg;
use base64::Engine;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

/// Longest allowlist line accepted.
pub const MAX_ALLOWLIST_LINE: usize = 8 * 1024;

/// A policy that cannot be used, with where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy JSON, line {line} column {column}: {detail}")]
    Json {
        line: usize,
        column: usize,
        detail: String,
    },
    #[error("digest {value:?} of {path:?}: {detail}")]
    InvalidDigest {
        path: String,
        value: String,
        detail: &'static str,
    },
    #[error("exclude pattern {index} ({pattern:?}): {detail}")]
    InvalidRegex {
        index: usize,
        pattern: String,
        detail: String,
    },
    #[error("key {index}: {detail}")]
    InvalidKey { index: usize, detail: String },
    #[error("allowlist line {line}: {detail}")]
    Allowlist { line: usize, detail: String },
    #[error("policy too large for the lookup table (more than 4 GiB of paths and digests)")]
    TooLarge,
    #[error("allowlist line {line}: {len} bytes, longer than the {max}-byte limit")]
    LineTooLong { line: usize, len: usize, max: usize },
}

impl PolicyError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Json { .. } => "policy_invalid_json",
            Self::InvalidDigest { .. } => "policy_invalid_digest",
            Self::InvalidRegex { .. } => "policy_invalid_regex",
            Self::InvalidKey { .. } => "policy_invalid_key",
            Self::Allowlist { .. } => "policy_invalid_allowlist_line",
            Self::LineTooLong { .. } => "policy_line_too_long",
            Self::TooLarge => "policy_too_large",
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(140).collect()
}

/// Our policy JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Path → allowed file digests, `alg:hex` or plain hex (algorithm by
    /// length: 40 sha1, 64 sha256, 96 sha384, 128 sha512).
    #[serde(default)]
    pub digests: BTreeMap<String, Vec<String>>,
    /// Regexes (Rust `regex` syntax) matched at the start of a path; a
    /// matching path is not judged.
    #[serde(default)]
    pub excludes: Vec<String>,
    /// Keys that may sign files (`ima-sig`): SubjectPublicKeyInfo as PEM or
    /// base64 DER; RSA or ECDSA P-256.
    #[serde(default)]
    pub keys: Vec<String>,
    /// `ima-buf` entries that are keys loaded into a keyring: keyring → digests.
    #[serde(default)]
    pub keyrings: BTreeMap<String, Vec<String>>,
    /// Other `ima-buf` entries: buffer name → digests.
    #[serde(default)]
    pub ima_buf: BTreeMap<String, Vec<String>>,
    /// `ima-buf` names (or `*`) not judged.
    #[serde(default)]
    pub ignored_keyrings: Vec<String>,
    /// Accept violation (ToMToU / open-writers) entries.
    #[serde(default)]
    pub allow_violations: bool,
}

/// A policy ready for verification. It serializes as its
/// [`PolicyDocument`]. Clones share one compiled form and one fingerprint,
/// so a policy stored once is compiled once however many attestations it
/// judges (compiling 100,000 paths takes ~0.2 s).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "PolicyDocument", into = "PolicyDocument")]
pub struct RuntimePolicy {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    doc: PolicyDocument,
    compiled: OnceLock<Result<CompiledPolicy, PolicyError>>,
    fingerprint: OnceLock<String>,
}

impl From<PolicyDocument> for RuntimePolicy {
    fn from(doc: PolicyDocument) -> Self {
        Self {
            inner: Arc::new(Inner {
                doc,
                compiled: OnceLock::new(),
                fingerprint: OnceLock::new(),
            }),
        }
    }
}

impl From<RuntimePolicy> for PolicyDocument {
    fn from(p: RuntimePolicy) -> Self {
        Arc::try_unwrap(p.inner)
            .map(|i| i.doc)
            .unwrap_or_else(|shared| shared.doc.clone())
    }
}

/// Policies are equal when their documents are.
impl PartialEq for RuntimePolicy {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) || self.inner.doc == other.inner.doc
    }
}

impl Eq for RuntimePolicy {}

/// Keylime runtime-policy JSON (format version 1); only the fields used.
#[derive(Deserialize)]
struct KeylimePolicy {
    digests: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    excludes: Vec<String>,
    #[serde(default)]
    keyrings: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    ima: Option<KeylimeIma>,
    #[serde(rename = "ima-buf", default)]
    ima_buf: BTreeMap<String, Vec<String>>,
    #[serde(rename = "verification-keys", default)]
    verification_keys: String,
}

#[derive(Deserialize)]
struct KeylimeIma {
    #[serde(default)]
    ignored_keyrings: Vec<String>,
}

fn json_error(e: serde_json::Error) -> PolicyError {
    PolicyError::Json {
        line: e.line(),
        column: e.column(),
        detail: e.to_string(),
    }
}

impl RuntimePolicy {
    pub fn new(doc: PolicyDocument) -> Self {
        doc.into()
    }

    pub fn document(&self) -> &PolicyDocument {
        &self.inner.doc
    }

    /// A stable name of the policy's content (hex SHA-256 of its document's
    /// JSON): versions of a whitelist that keep the same runtime policy keep
    /// what it found. Computed once per policy.
    pub fn fingerprint(&self) -> &str {
        self.inner.fingerprint.get_or_init(|| {
            // A document of strings, maps and a bool always serializes.
            let json = serde_json::to_vec(&self.inner.doc).unwrap_or_default();
            hex::encode(HashAlg::Sha256.hash(&[&json]))
        })
    }

    /// Our JSON.
    pub fn from_json(input: &[u8]) -> Result<Self, PolicyError> {
        let doc: PolicyDocument = serde_json::from_slice(input).map_err(json_error)?;
        Ok(doc.into())
    }

    /// Keylime's runtime-policy JSON. Its exclude patterns are Python
    /// regexes; the common subset means the same in Rust's syntax, others
    /// fail [`validate`](Self::validate) naming the pattern.
    pub fn from_keylime_json(input: &[u8]) -> Result<Self, PolicyError> {
        let k: KeylimePolicy = serde_json::from_slice(input).map_err(json_error)?;
        let keys = keylime_verification_keys(&k.verification_keys)?;
        Ok(PolicyDocument {
            digests: k.digests,
            excludes: k.excludes,
            keys,
            keyrings: k.keyrings,
            ima_buf: k.ima_buf,
            ignored_keyrings: k.ima.map(|i| i.ignored_keyrings).unwrap_or_default(),
            allow_violations: false,
        }
        .into())
    }

    /// A flat allowlist: `digest  path` per line (`sha256:` prefixes
    /// allowed), `digest %keyring:NAME` for keyring keys, `#` comments.
    pub fn from_allowlist(input: &str) -> Result<Self, PolicyError> {
        let mut doc = PolicyDocument::default();
        for (i, raw) in input.split('\n').enumerate() {
            let line = i + 1;
            if raw.len() > MAX_ALLOWLIST_LINE {
                return Err(PolicyError::LineTooLong {
                    line,
                    len: raw.len(),
                    max: MAX_ALLOWLIST_LINE,
                });
            }
            let l = raw.trim_end_matches(['\r', '\n']);
            if l.trim().is_empty() || l.trim_start().starts_with('#') {
                continue;
            }
            let (digest, path) = l
                .trim_start()
                .split_once(char::is_whitespace)
                .map(|(d, p)| (d, p.trim_start()))
                .filter(|(_, p)| !p.is_empty())
                .ok_or_else(|| PolicyError::Allowlist {
                    line,
                    detail: "expected `digest  path`".into(),
                })?;
            if parse_digest(digest).is_none() {
                return Err(PolicyError::Allowlist {
                    line,
                    detail: format!("{:?} is not a digest", clip(digest)),
                });
            }
            let (map, key) = match path.strip_prefix("%keyring:") {
                Some(ring) => (&mut doc.keyrings, ring),
                None => (&mut doc.digests, path),
            };
            map.entry(key.to_string())
                .or_default()
                .push(digest.to_string());
        }
        Ok(doc.into())
    }

    /// Check every digest, regex and key.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.compiled().map(|_| ())
    }

    pub(crate) fn compiled(&self) -> Result<&CompiledPolicy, PolicyError> {
        self.inner
            .compiled
            .get_or_init(|| CompiledPolicy::new(&self.inner.doc))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Keylime keeps keys as a JSON string of `{keyring: JSON string of
/// {"pubkeys": [base64 DER], "keyids": [...]}}`.
fn keylime_verification_keys(s: &str) -> Result<Vec<String>, PolicyError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let outer: serde_json::Value = serde_json::from_str(s).map_err(json_error)?;
    let mut keys = Vec::new();
    if let serde_json::Value::Object(rings) = outer {
        for (_, ring) in rings {
            let ring = match ring {
                serde_json::Value::String(inner) => {
                    serde_json::from_str(&inner).map_err(json_error)?
                }
                v => v,
            };
            if let Some(list) = ring.get("pubkeys").and_then(|p| p.as_array()) {
                keys.extend(list.iter().filter_map(|k| k.as_str().map(str::to_string)));
            }
        }
    }
    Ok(keys)
}

/// An allowed digest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PolicyDigest {
    alg: HashAlg,
    bytes: DigestBytes,
}

/// Entries whose policy records [`CompiledPolicy::warm`] loads together.
pub(crate) const WARM_GROUP: usize = 64;

/// A fast unkeyed hash of a path (the FxHash multiply-rotate over 8-byte
/// words, then a final mix). Table keys come from the policy (trusted); a
/// host's paths only look up and cannot build collision chains.
fn path_hash(bytes: &[u8]) -> u64 {
    const SEED: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = 0u64;
    let mut add = |w: u64| h = (h.rotate_left(5) ^ w).wrapping_mul(SEED);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        add(u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    let mut w = [0u8; 8];
    w[..rest.len()].copy_from_slice(rest);
    add(u64::from_le_bytes(w) ^ ((bytes.len() as u64) << 56));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn alg_code(alg: HashAlg) -> u8 {
    match alg {
        HashAlg::Sha1 => 1,
        HashAlg::Sha256 => 2,
        HashAlg::Sha384 => 3,
        HashAlg::Sha512 => 4,
    }
}

fn alg_of_code(c: u8) -> Option<HashAlg> {
    match c {
        1 => Some(HashAlg::Sha1),
        2 => Some(HashAlg::Sha256),
        3 => Some(HashAlg::Sha384),
        4 => Some(HashAlg::Sha512),
        _ => None,
    }
}

/// Path → allowed digests, laid out for lookups that miss the cache (with
/// 100,000 paths, all of them do): open addressing over 8-byte slots
/// (32-bit hash tag, record offset + 1), and one arena of records
/// `[path len u32][count u8][count x (alg u8, digest)][path]`, so a lookup
/// touches a slot and one record. A `HashMap<Box<str>, Vec<_>>` followed
/// three pointers per lookup and ran at half the speed.
#[derive(Debug, Clone, Default)]
struct PathTable {
    slots: Vec<u64>,
    arena: Vec<u8>,
}

/// One path's record.
struct Record<'a> {
    digests: &'a [u8],
}

impl<'a> Record<'a> {
    fn iter(&self) -> impl Iterator<Item = (HashAlg, &'a [u8])> + 'a {
        let mut rest = self.digests;
        std::iter::from_fn(move || {
            let (&code, tail) = rest.split_first()?;
            let alg = alg_of_code(code)?;
            let d = tail.get(..alg.digest_len())?;
            rest = tail.get(alg.digest_len()..).unwrap_or_default();
            Some((alg, d))
        })
    }
    fn allows(&self, alg: HashAlg, digest: &[u8]) -> bool {
        self.iter().any(|(a, d)| a == alg && d == digest)
    }
    fn display(&self) -> Vec<String> {
        self.iter()
            .map(|(a, d)| format!("{a}:{}", hex::encode(d)))
            .collect()
    }
}

impl PathTable {
    fn build(m: &BTreeMap<String, Vec<PolicyDigest>>) -> Result<Self, PolicyError> {
        let n = m.len().max(4);
        let size = n
            .checked_mul(2)
            .map(usize::next_power_of_two)
            .ok_or(PolicyError::TooLarge)?;
        let mut t = Self {
            slots: vec![0; size],
            arena: Vec::new(),
        };
        let mask = size - 1;
        for (path, ds) in m {
            let offset = u32::try_from(t.arena.len())
                .ok()
                .filter(|o| *o < u32::MAX)
                .ok_or(PolicyError::TooLarge)?;
            let plen = u32::try_from(path.len()).map_err(|_| PolicyError::TooLarge)?;
            let count = u8::try_from(ds.len()).map_err(|_| PolicyError::InvalidDigest {
                path: clip(path),
                value: String::new(),
                detail: "more than 255 digests for one path",
            })?;
            t.arena.extend_from_slice(&plen.to_le_bytes());
            t.arena.push(count);
            for d in ds {
                t.arena.push(alg_code(d.alg));
                t.arena.extend_from_slice(d.bytes.as_slice());
            }
            t.arena.extend_from_slice(path.as_bytes());
            let h = path_hash(path.as_bytes());
            let mut i = (h as usize) & mask;
            while t.slots.get(i).is_some_and(|s| *s != 0) {
                i = (i + 1) & mask;
            }
            if let Some(slot) = t.slots.get_mut(i) {
                *slot = ((h >> 32) << 32) | u64::from(offset + 1);
            }
        }
        Ok(t)
    }

    fn record_at(&self, offset: usize) -> Option<(&[u8], Record<'_>)> {
        let head = self.arena.get(offset..offset + 5)?;
        let plen = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let mut pos = offset + 5;
        for _ in 0..head[4] {
            let alg = alg_of_code(*self.arena.get(pos)?)?;
            pos += 1 + alg.digest_len();
        }
        let digests = self.arena.get(offset + 5..pos)?;
        let path = self.arena.get(pos..pos + plen)?;
        Some((path, Record { digests }))
    }

    /// The record of `path`, whose [`path_hash`] is `h`.
    fn get(&self, path: &[u8], h: u64) -> Option<Record<'_>> {
        let mask = self.slots.len().checked_sub(1)?;
        let tag = h >> 32;
        let mut i = (h as usize) & mask;
        loop {
            let s = *self.slots.get(i)?;
            if s == 0 {
                return None;
            }
            if s >> 32 == tag {
                let offset = ((s & 0xffff_ffff) - 1) as usize;
                if let Some((p, r)) = self.record_at(offset) {
                    if p == path {
                        return Some(r);
                    }
                }
            }
            i = (i + 1) & mask;
        }
    }
}

fn parse_digest(s: &str) -> Option<PolicyDigest> {
    let (alg, hx) = match s.split_once(':') {
        Some((a, h)) => (Some(HashAlg::parse(a)?), h),
        None => (None, s),
    };
    let raw = hex::decode(hx).ok()?;
    let bytes = DigestBytes::from_slice(&raw)?;
    let by_len = match raw.len() {
        20 => HashAlg::Sha1,
        32 => HashAlg::Sha256,
        48 => HashAlg::Sha384,
        64 => HashAlg::Sha512,
        _ => return None,
    };
    let alg = alg.unwrap_or(by_len);
    (alg.digest_len() == raw.len()).then_some(PolicyDigest { alg, bytes })
}

#[derive(Debug, Clone)]
enum VerifyKey {
    Rsa(Box<rsa::RsaPublicKey>),
    P256(p256::ecdsa::VerifyingKey),
}

/// The policy in the form verification uses.
#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    digests: PathTable,
    keyrings: PathTable,
    ima_buf: PathTable,
    excludes: Option<Regex>,
    /// By IMA key id (the last 4 bytes of the key's SHA-1 subject key id).
    keys: HashMap<u32, Vec<VerifyKey>>,
    ignored_keyrings: Vec<String>,
    pub(crate) allow_violations: bool,
}

type Verdict = Result<(), (FailureCode, Vec<String>)>;

fn compile_map(m: &BTreeMap<String, Vec<String>>) -> Result<PathTable, PolicyError> {
    let mut parsed = BTreeMap::new();
    for (path, list) in m {
        let mut ds = Vec::with_capacity(list.len());
        for v in list {
            ds.push(parse_digest(v).ok_or_else(|| PolicyError::InvalidDigest {
                path: clip(path),
                value: clip(v),
                detail: "expected hex of a sha1/256/384/512 digest, optionally `alg:`-prefixed",
            })?);
        }
        // A path listed with no digests allows nothing (Keylime writes `[]`).
        parsed.insert(path.clone(), ds);
    }
    PathTable::build(&parsed)
}

fn parse_key(index: usize, s: &str) -> Result<(u32, VerifyKey), PolicyError> {
    use p256::pkcs8::DecodePublicKey as _;
    use rsa::pkcs1::EncodeRsaPublicKey as _;
    use sha1::{Digest, Sha1};
    let der = if s.trim_start().starts_with("-----BEGIN") {
        let body: String = s
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .flat_map(|l| l.trim().chars())
            .collect();
        base64::engine::general_purpose::STANDARD.decode(body)
    } else {
        base64::engine::general_purpose::STANDARD.decode(s.trim())
    }
    .map_err(|e| PolicyError::InvalidKey {
        index,
        detail: format!("not PEM or base64: {e}"),
    })?;
    // The kernel's key id is the tail of the X.509 subject key id, the
    // SHA-1 of the subjectPublicKey bits (RFC 5280 4.2.1.2 method 1).
    let keyid = |bits: &[u8]| {
        let h = Sha1::digest(bits);
        u32::from_be_bytes([h[16], h[17], h[18], h[19]])
    };
    if let Ok(k) = rsa::RsaPublicKey::from_public_key_der(&der) {
        let bits = k.to_pkcs1_der().map_err(|e| PolicyError::InvalidKey {
            index,
            detail: e.to_string(),
        })?;
        return Ok((keyid(bits.as_bytes()), VerifyKey::Rsa(Box::new(k))));
    }
    match p256::PublicKey::from_public_key_der(&der) {
        Ok(k) => {
            use p256::elliptic_curve::sec1::ToEncodedPoint as _;
            let point = k.to_encoded_point(false);
            Ok((keyid(point.as_bytes()), VerifyKey::P256(k.into())))
        }
        Err(e) => Err(PolicyError::InvalidKey {
            index,
            detail: format!("neither an RSA nor a P-256 SubjectPublicKeyInfo: {e}"),
        }),
    }
}

/// DER DigestInfo prefixes for PKCS#1 v1.5 (RFC 8017, 9.2 note 1).
fn digest_info_prefix(alg: HashAlg) -> &'static [u8] {
    match alg {
        HashAlg::Sha1 => &[
            0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04,
            0x14,
        ],
        HashAlg::Sha256 => &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        HashAlg::Sha384 => &[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ],
        HashAlg::Sha512 => &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
    }
}

/// The kernel's `enum hash_algo` values used in signature headers.
fn kernel_hash_algo(v: u8) -> Option<HashAlg> {
    match v {
        2 => Some(HashAlg::Sha1),
        4 => Some(HashAlg::Sha256),
        5 => Some(HashAlg::Sha384),
        6 => Some(HashAlg::Sha512),
        _ => None,
    }
}

/// The kernel's `enum hash_algo` value of `alg`.
pub fn kernel_hash_algo_id(alg: HashAlg) -> u8 {
    match alg {
        HashAlg::Sha1 => 2,
        HashAlg::Sha256 => 4,
        HashAlg::Sha384 => 5,
        HashAlg::Sha512 => 6,
    }
}

/// The IMA key id (last 4 bytes of the subject key id) of a key as the
/// policy would accept it; for tooling and tests.
pub fn key_id(key: &str) -> Result<u32, PolicyError> {
    parse_key(0, key).map(|(id, _)| id)
}

impl CompiledPolicy {
    fn new(doc: &PolicyDocument) -> Result<Self, PolicyError> {
        let mut alternatives = Vec::with_capacity(doc.excludes.len());
        for (index, p) in doc.excludes.iter().enumerate() {
            // Each pattern alone first, so an error names the pattern.
            Regex::new(p).map_err(|e| PolicyError::InvalidRegex {
                index,
                pattern: clip(p),
                detail: e.to_string(),
            })?;
            alternatives.push(format!("(?:{p})"));
        }
        let excludes = if alternatives.is_empty() {
            None
        } else {
            // Anchored at the start only, like Python's re.match.
            let combined = format!("^(?:{})", alternatives.join("|"));
            Some(
                Regex::new(&combined).map_err(|e| PolicyError::InvalidRegex {
                    index: 0,
                    pattern: "(all patterns combined)".into(),
                    detail: e.to_string(),
                })?,
            )
        };
        let mut keys: HashMap<u32, Vec<VerifyKey>> = HashMap::new();
        for (index, k) in doc.keys.iter().enumerate() {
            let (id, key) = parse_key(index, k)?;
            keys.entry(id).or_default().push(key);
        }
        Ok(Self {
            digests: compile_map(&doc.digests)?,
            keyrings: compile_map(&doc.keyrings)?,
            ima_buf: compile_map(&doc.ima_buf)?,
            excludes,
            keys,
            ignored_keyrings: doc.ignored_keyrings.clone(),
            allow_violations: doc.allow_violations,
        })
    }

    fn excluded(&self, path: &str) -> bool {
        self.excludes.as_ref().is_some_and(|r| r.is_match(path))
    }

    /// Judge one entry against `map`. The exclude regex runs only when the
    /// digest check fails: an excluded path passes either way, and most
    /// entries are allowed by digest.
    fn check(&self, map: &PathTable, e: &EntryRef<'_>, hash: u64) -> Verdict {
        match map.get(e.name_bytes(), hash) {
            Some(r) if r.allows(e.digest_alg, e.digest()) => Ok(()),
            _ if self.excluded(&e.name()) => Ok(()),
            Some(r) => Err((FailureCode::DigestMismatch, r.display())),
            None => Err((FailureCode::NotInPolicy, Vec::new())),
        }
    }

    /// IMA signature v2: type 0x03, version 2, hash algo, 4-byte key id,
    /// 2-byte size, signature over the file digest.
    fn signature_ok(&self, e: &EntryRef<'_>) -> bool {
        let sig = e.extra();
        let (Some(&[3, 2, algo]), Some(kid), Some(size), Some(payload)) =
            (sig.get(..3), sig.get(3..7), sig.get(7..9), sig.get(9..))
        else {
            return false;
        };
        let (Ok(kid), Ok(size)) = (<[u8; 4]>::try_from(kid), <[u8; 2]>::try_from(size)) else {
            return false;
        };
        if usize::from(u16::from_be_bytes(size)) != payload.len()
            || kernel_hash_algo(algo) != Some(e.digest_alg)
        {
            return false;
        }
        let Some(keys) = self.keys.get(&u32::from_be_bytes(kid)) else {
            return false;
        };
        keys.iter().any(|k| match k {
            VerifyKey::Rsa(k) => {
                let scheme = rsa::Pkcs1v15Sign {
                    hash_len: Some(e.digest_alg.digest_len()),
                    prefix: digest_info_prefix(e.digest_alg).into(),
                };
                k.verify(scheme, e.digest(), payload).is_ok()
            }
            VerifyKey::P256(k) => {
                use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
                p256::ecdsa::Signature::from_der(payload)
                    .is_ok_and(|s| k.verify_prehash(e.digest(), &s).is_ok())
            }
        })
    }

    /// The path hashes of the first [`WARM_GROUP`] of `entries`, for
    /// [`Self::evaluate`], after bringing into the cache what it will read
    /// for them (see `ima::judge`). With 100,000 paths nearly every lookup
    /// misses the cache twice (slot, then record): all path hashes first,
    /// then all slot loads, then the loads of the records they point to;
    /// the loads of one phase do not depend on each other, so their misses
    /// overlap instead of queueing.
    pub(crate) fn warm<'a>(
        &self,
        entries: impl Iterator<Item = EntryRef<'a>>,
    ) -> [u64; WARM_GROUP] {
        let mut hashes = [0u64; WARM_GROUP];
        for (h, e) in hashes.iter_mut().zip(entries) {
            *h = path_hash(e.name_bytes());
        }
        let t = &self.digests;
        let Some(mask) = t.slots.len().checked_sub(1) else {
            return hashes;
        };
        let mut slots = [0u64; WARM_GROUP];
        for (s, h) in slots.iter_mut().zip(&hashes) {
            *s = t.slots.get((*h as usize) & mask).copied().unwrap_or(0);
        }
        let mut touched = 0u8;
        for (s, h) in slots.iter().zip(&hashes) {
            if *s != 0 && s >> 32 == h >> 32 {
                let offset = ((s & 0xffff_ffff) - 1) as usize;
                touched ^= t.arena.get(offset).copied().unwrap_or(0);
                touched ^= t.arena.get(offset + 64).copied().unwrap_or(0);
            }
        }
        std::hint::black_box(touched);
        hashes
    }

    /// The policy's verdict on `e`, whose name hashes to `hash` (from
    /// [`Self::warm`]; computing it once saves a pass over every path).
    pub(crate) fn evaluate(&self, e: &EntryRef<'_>, hash: u64) -> Verdict {
        debug_assert_eq!(hash, path_hash(e.name_bytes()));
        match e.template {
            Template::Ima | Template::ImaNg => self.check(&self.digests, e, hash),
            Template::ImaSig => {
                let signed = !e.extra().is_empty() && !self.keys.is_empty();
                if signed && !self.excluded(&e.name()) && self.signature_ok(e) {
                    return Ok(());
                }
                match self.check(&self.digests, e, hash) {
                    Err((FailureCode::NotInPolicy, x)) if signed => {
                        Err((FailureCode::SignatureInvalid, x))
                    }
                    v => v,
                }
            }
            Template::ImaBuf => {
                let name = e.name();
                if self
                    .ignored_keyrings
                    .iter()
                    .any(|k| k == "*" || *k == *name)
                {
                    return Ok(());
                }
                if self.keyrings.get(e.name_bytes(), hash).is_some() {
                    self.check(&self.keyrings, e, hash)
                } else {
                    self.check(&self.ima_buf, e, hash)
                }
            }
        }
    }
}

/// The SHA-256 DigestInfo prefix, for tests that sign.
#[cfg(test)]
pub(crate) fn tests_prefix_sha256() -> &'static [u8] {
    digest_info_prefix(HashAlg::Sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOWLIST: &str = include_str!("../../fixtures/ima/ima-allowlist-short.txt");
    const KEYLIME_JSON: &[u8] = include_bytes!("../../fixtures/ima/runtime-policy-test.json");

    #[test]
    fn allowlist_and_keylime_json_agree() {
        let flat = RuntimePolicy::from_allowlist(ALLOWLIST).unwrap();
        let json = RuntimePolicy::from_keylime_json(KEYLIME_JSON).unwrap();
        flat.validate().unwrap();
        json.validate().unwrap();
        assert_eq!(flat.document().digests, json.document().digests);
        assert_eq!(flat.document().keyrings, json.document().keyrings);
        assert_eq!(flat.document().digests.len(), 21);
        assert_eq!(
            flat.document().keyrings[".ima"],
            vec!["a7d52aaa18c23d2d9bb2abb4308c0eeee67387a42259f4a6b1a42257065f3d5a".to_string()]
        );
        assert_eq!(
            parse_digest(&flat.document().digests["boot_aggregate"][0])
                .unwrap()
                .alg,
            HashAlg::Sha256
        );
        // Our JSON round-trips.
        let ours = serde_json::to_vec(&json).unwrap();
        let back = RuntimePolicy::from_json(&ours).unwrap();
        assert_eq!(back.document(), json.document());
    }

    #[test]
    fn bad_policies_name_the_problem() {
        let e = RuntimePolicy::from_allowlist("0123  /ok\n\nnot-a-digest /x\n").unwrap_err();
        assert_eq!(e.code(), "policy_invalid_allowlist_line");
        assert!(matches!(e, PolicyError::Allowlist { line: 1, .. }), "{e}");
        let e = RuntimePolicy::from_allowlist(&format!("{}  /a\nnopath\n", "ab".repeat(20)))
            .unwrap_err();
        assert!(matches!(e, PolicyError::Allowlist { line: 2, .. }), "{e}");
        let e = RuntimePolicy::from_allowlist(&"a".repeat(MAX_ALLOWLIST_LINE + 1)).unwrap_err();
        assert_eq!(e.code(), "policy_line_too_long");

        let e = RuntimePolicy::from_keylime_json(b"{\"digests\": {}\n, oops}").unwrap_err();
        assert!(matches!(e, PolicyError::Json { line: 2, .. }), "{e}");

        let doc = PolicyDocument {
            excludes: vec!["/tmp/.*".into(), "/proc/(?=x)".into()],
            ..Default::default()
        };
        let e = RuntimePolicy::new(doc).validate().unwrap_err();
        assert_eq!(e.code(), "policy_invalid_regex");
        assert!(
            matches!(e, PolicyError::InvalidRegex { index: 1, .. }),
            "{e}"
        );

        let mut doc = PolicyDocument::default();
        doc.digests
            .insert("/bin/x".into(), vec!["sha256:abcd".into()]);
        let e = RuntimePolicy::new(doc).validate().unwrap_err();
        assert!(
            matches!(&e, PolicyError::InvalidDigest { path, .. } if path == "/bin/x"),
            "{e}"
        );

        let doc = PolicyDocument {
            keys: vec!["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into()],
            ..Default::default()
        };
        let e = RuntimePolicy::new(doc).validate().unwrap_err();
        assert!(matches!(e, PolicyError::InvalidKey { index: 0, .. }), "{e}");
        let e = RuntimePolicy::from_json(b"{\"digest\": {}}").unwrap_err();
        assert_eq!(e.code(), "policy_invalid_json");
    }
}
