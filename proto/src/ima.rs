//! Linux IMA runtime measurement lists: the ascii and the binary format with
//! the `ima`, `ima-ng`, `ima-sig` and `ima-buf` templates, template hashes,
//! the PCR 10 replay per bank, and incremental verification against a
//! [`RuntimePolicy`].
//!
//! Formats (Linux `Documentation/security/IMA-templates.rst`, `ima_fs.c`):
//! - ascii: `PCR TEMPLATE-HASH TEMPLATE-NAME FIELD...`, one entry per line,
//!   fields separated by one space (an empty last field leaves a trailing
//!   space).
//! - binary: per entry, little-endian `u32` PCR, 20-byte SHA-1 template hash,
//!   `u32` name length + name, then (except for `ima`) `u32` data length +
//!   template data, whose fields are each `u32` length + bytes.
//!
//! A violation (an open-for-write during a measured read) is logged with an
//! all-zero template hash but extends the PCR with all ones.

use crate::runtime_policy::{CompiledPolicy, PolicyError, RuntimePolicy, WARM_GROUP};
use crate::HashAlg;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::ops::Range;

/// Longest ascii line accepted (an `ima-buf` key in hex fits comfortably).
pub const MAX_ASCII_LINE: usize = 8 * 1024;
/// Longest template name in the binary list (the kernel allows 15).
const MAX_TEMPLATE_NAME: usize = 255;
/// The `ima` template hashes its file name padded to this many bytes.
const IMA_NAME_HASH_LEN: usize = 256;
/// Failures kept in an outcome; the count goes on beyond it.
pub const MAX_REPORTED_FAILURES: usize = 100;
/// Allowed digests shown in a failure; a policy is never echoed whole.
const MAX_EXPECTED_SHOWN: usize = 4;

/// Parsing failure, with the ascii line (1-based) or the binary byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImaError {
    #[error("line {line}: {len} bytes, longer than the {max}-byte limit")]
    LineTooLong { line: usize, len: usize, max: usize },
    #[error("line {line}: {field}: {detail}")]
    Malformed {
        line: usize,
        field: &'static str,
        detail: String,
    },
    #[error("line {line}: not UTF-8")]
    NotUtf8 { line: usize },
    #[error("entry {entry} (line/offset {line}): unsupported template {name:?}")]
    UnsupportedTemplate {
        entry: usize,
        line: usize,
        name: String,
    },
    #[error("entry {entry} (line/offset {line}): unsupported digest algorithm {name:?}")]
    UnsupportedAlgorithm {
        entry: usize,
        line: usize,
        name: String,
    },
    #[error("binary entry {entry}: {structure} truncated at byte {offset} (needed {needed} more)")]
    Truncated {
        entry: usize,
        structure: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("binary entry {entry} at byte {offset}: {field}: {detail}")]
    BinaryMalformed {
        entry: usize,
        offset: usize,
        field: &'static str,
        detail: String,
    },
    #[error("the list has {len} entries, fewer than the {verified} already verified")]
    ListShrank { len: usize, verified: u64 },
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl ImaError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::LineTooLong { .. } => "ima_line_too_long",
            Self::Malformed { .. } => "ima_malformed_line",
            Self::NotUtf8 { .. } => "ima_not_utf8",
            Self::UnsupportedTemplate { .. } => "ima_unsupported_template",
            Self::UnsupportedAlgorithm { .. } => "ima_unsupported_algorithm",
            Self::Truncated { .. } => "ima_truncated",
            Self::BinaryMalformed { .. } => "ima_malformed_entry",
            Self::ListShrank { .. } => "ima_list_shrank",
            Self::Policy(e) => e.code(),
        }
    }
}

/// The templates understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Template {
    /// `d|n`: SHA-1 digest, name (legacy).
    Ima,
    /// `d-ng|n-ng`.
    ImaNg,
    /// `d-ng|n-ng|sig`.
    ImaSig,
    /// `d-ng|n-ng|buf`.
    ImaBuf,
}

impl Template {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ima => "ima",
            Self::ImaNg => "ima-ng",
            Self::ImaSig => "ima-sig",
            Self::ImaBuf => "ima-buf",
        }
    }
    fn parse(name: &[u8]) -> Option<Self> {
        match name {
            b"ima" => Some(Self::Ima),
            b"ima-ng" => Some(Self::ImaNg),
            b"ima-sig" => Some(Self::ImaSig),
            b"ima-buf" => Some(Self::ImaBuf),
            _ => None,
        }
    }
    fn field_count(self) -> usize {
        match self {
            Self::Ima | Self::ImaNg => 2,
            Self::ImaSig | Self::ImaBuf => 3,
        }
    }
}

/// A digest of at most 64 bytes, kept inline (no allocation per entry).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DigestBytes {
    len: u8,
    buf: [u8; 64],
}

impl DigestBytes {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let len = u8::try_from(b.len()).ok().filter(|l| *l <= 64)?;
        let mut buf = [0u8; 64];
        buf.get_mut(..b.len())?.copy_from_slice(b);
        Some(Self { len, buf })
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len).min(64)]
    }
    fn filled(len: usize, byte: u8) -> Self {
        let len = len.min(64);
        let mut buf = [0u8; 64];
        buf[..len].fill(byte);
        Self {
            len: len as u8,
            buf,
        }
    }
}

impl std::fmt::Debug for DigestBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.as_slice()))
    }
}

/// One measurement. The template data is kept in its binary (canonical)
/// form; the fields are ranges into it, so an entry costs one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImaEntry {
    /// 1-based ascii line, or the byte offset of the entry in a binary list.
    pub line: usize,
    pub pcr: u32,
    /// The template hash as logged (SHA-1 in both formats of today's kernels).
    pub template_hash: DigestBytes,
    pub template: Template,
    /// Algorithm of the file digest.
    pub digest_alg: HashAlg,
    data: Vec<u8>,
    digest: Range<usize>,
    name: Range<usize>,
    extra: Range<usize>,
}

impl ImaEntry {
    fn empty() -> Self {
        Self {
            line: 0,
            pcr: 0,
            template_hash: DigestBytes::filled(20, 0),
            template: Template::ImaNg,
            digest_alg: HashAlg::Sha1,
            data: Vec::new(),
            digest: 0..0,
            name: 0..0,
            extra: 0..0,
        }
    }

    /// The entry as the borrowed form judging and hashing take.
    pub fn view(&self) -> EntryRef<'_> {
        EntryRef::new(
            self.line,
            self.pcr,
            self.template,
            self.digest_alg,
            self.template_hash.as_slice(),
            &self.data,
            [&self.digest, &self.name, &self.extra].map(|r| (r.start, r.end)),
        )
    }

    /// The file (or buffer) digest.
    pub fn digest(&self) -> &[u8] {
        self.data.get(self.digest.clone()).unwrap_or_default()
    }
    /// The path (or buffer name), without the kernel's trailing NUL.
    pub fn name(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.name_bytes())
    }
    /// The name's bytes (policy lookups need no UTF-8 check).
    pub fn name_bytes(&self) -> &[u8] {
        self.data.get(self.name.clone()).unwrap_or_default()
    }
    /// `ima-sig`: the signature (maybe empty); `ima-buf`: the buffer.
    pub fn extra(&self) -> &[u8] {
        self.data.get(self.extra.clone()).unwrap_or_default()
    }
    /// The template data as the binary list carries it.
    pub fn template_data(&self) -> &[u8] {
        &self.data
    }
    /// A violation: logged template hash all zeros.
    pub fn is_violation(&self) -> bool {
        self.view().is_violation()
    }

    /// The template hash with `alg`, as the kernel extends that bank with it.
    pub fn template_hash_for(&self, alg: HashAlg) -> DigestBytes {
        self.view().template_hash_for(alg)
    }

    /// The hash of the template data, ignoring violations.
    fn compute_template_hash(&self, alg: HashAlg) -> DigestBytes {
        self.view().compute_template_hash(alg)
    }
}

/// One measurement, borrowed: from an [`ImaEntry`] or from the compact
/// list a [`Replayed`] holds (every entry's bytes in one buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub line: usize,
    pub pcr: u32,
    pub template: Template,
    pub digest_alg: HashAlg,
    template_hash: &'a [u8],
    data: &'a [u8],
    /// The digest, name and extra fields: (start, end) in `data`.
    fields: [(usize, usize); 3],
}

impl<'a> EntryRef<'a> {
    /// `fields`: the digest, name and extra as (start, end) in `data`.
    fn new(
        line: usize,
        pcr: u32,
        template: Template,
        digest_alg: HashAlg,
        template_hash: &'a [u8],
        data: &'a [u8],
        fields: [(usize, usize); 3],
    ) -> Self {
        Self {
            line,
            pcr,
            template,
            digest_alg,
            template_hash,
            data,
            fields,
        }
    }

    fn field(&self, i: usize) -> &'a [u8] {
        let (start, end) = self.fields.get(i).copied().unwrap_or_default();
        self.data.get(start..end).unwrap_or_default()
    }

    /// The template hash as logged.
    pub fn template_hash(&self) -> &'a [u8] {
        self.template_hash
    }
    /// The file (or buffer) digest.
    pub fn digest(&self) -> &'a [u8] {
        self.field(0)
    }
    /// The path (or buffer name), without the kernel's trailing NUL.
    pub fn name(&self) -> Cow<'a, str> {
        String::from_utf8_lossy(self.field(1))
    }
    /// The name's bytes (policy lookups need no UTF-8 check).
    pub fn name_bytes(&self) -> &'a [u8] {
        self.field(1)
    }
    /// `ima-sig`: the signature (maybe empty); `ima-buf`: the buffer.
    pub fn extra(&self) -> &'a [u8] {
        self.field(2)
    }
    /// The template data as the binary list carries it.
    pub fn template_data(&self) -> &'a [u8] {
        self.data
    }
    /// A violation: logged template hash all zeros.
    pub fn is_violation(&self) -> bool {
        self.template_hash.iter().all(|b| *b == 0)
    }

    /// The template hash with `alg`, as the kernel extends that bank with it.
    pub fn template_hash_for(&self, alg: HashAlg) -> DigestBytes {
        if self.is_violation() {
            return DigestBytes::filled(alg.digest_len(), 0xff);
        }
        self.compute_template_hash(alg)
    }

    /// The hash of the template data, ignoring violations.
    fn compute_template_hash(&self, alg: HashAlg) -> DigestBytes {
        match self.template {
            Template::Ima => {
                // `ima`: digest || name zero-padded to 256 bytes, no lengths.
                let mut input = [0u8; 20 + IMA_NAME_HASH_LEN];
                let (d, n) = (self.digest(), self.name_bytes());
                if let Some(dst) = input.get_mut(..d.len().min(20)) {
                    dst.copy_from_slice(d.get(..dst.len()).unwrap_or_default());
                }
                let nl = n.len().min(IMA_NAME_HASH_LEN);
                if let (Some(dst), Some(src)) = (input.get_mut(20..20 + nl), n.get(..nl)) {
                    dst.copy_from_slice(src);
                }
                digest(alg, &[&input])
            }
            _ => digest(alg, &[self.data]),
        }
    }

    /// An owned copy.
    pub fn to_entry(&self) -> ImaEntry {
        let [d, n, x] = self.fields.map(|(start, end)| start..end);
        ImaEntry {
            line: self.line,
            pcr: self.pcr,
            template_hash: DigestBytes::from_slice(self.template_hash)
                .unwrap_or(DigestBytes::filled(0, 0)),
            template: self.template,
            digest_alg: self.digest_alg,
            data: self.data.to_vec(),
            digest: d,
            name: n,
            extra: x,
        }
    }
}

/// Hash `parts` into an inline digest. The RustCrypto crates are used:
/// on the bench machine (SHA extensions) they beat ring by 1.5x (SHA-256)
/// and 4x (SHA-1, which ring runs without them) on IMA-sized inputs; see
/// the `hash/*` groups of proto/benches/ima.rs.
pub fn digest(alg: HashAlg, parts: &[&[u8]]) -> DigestBytes {
    if matches!(alg, HashAlg::Sha1 | HashAlg::Sha256) {
        if let Some(d) = short_digest(alg, parts) {
            return d;
        }
    }
    fn run<D: sha2::Digest>(parts: &[&[u8]]) -> DigestBytes {
        let mut h = D::new();
        for p in parts {
            h.update(p);
        }
        let out = h.finalize();
        DigestBytes::from_slice(&out).unwrap_or(DigestBytes {
            len: 0,
            buf: [0; 64],
        })
    }
    match alg {
        HashAlg::Sha1 => run::<sha1::Sha1>(parts),
        HashAlg::Sha256 => run::<sha2::Sha256>(parts),
        HashAlg::Sha384 => run::<sha2::Sha384>(parts),
        HashAlg::Sha512 => run::<sha2::Sha512>(parts),
    }
}

/// Initial SHA-1 and SHA-256 states (FIPS 180-4, 5.3.1 and 5.3.3).
const SHA1_H0: [u32; 5] = [
    0x6745_2301,
    0xefcd_ab89,
    0x98ba_dcfe,
    0x1032_5476,
    0xc3d2_e1f0,
];
const SHA256_H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// SHA-1 or SHA-256 of a message of at most 119 bytes (what IMA hashes:
/// ~80 bytes of template data, 64 bytes of an extend), padded here (FIPS
/// 180-4, 5.1.1) into one or two blocks for the crates' compression
/// functions: the streaming API's buffering cost as much as a block.
/// `None` for longer messages (and other algorithms).
fn short_digest(alg: HashAlg, parts: &[&[u8]]) -> Option<DigestBytes> {
    Padded::new(parts)?.hash(alg)
}

/// A short message as the 64-byte blocks SHA-1 and SHA-256 compress (they
/// pad alike, so one padding serves both): a whole first block, if there
/// is one, read where the message is; the rest padded here.
struct Padded<'a> {
    head: &'a [u8],
    tail: [u8; 128],
    tail_blocks: usize,
}

impl<'a> Padded<'a> {
    /// The message `parts` joined, `None` past 119 bytes; a message of one
    /// part is not copied whole (template data: its first block is not).
    fn new(parts: &[&'a [u8]]) -> Option<Self> {
        let (head, rest): (&[u8], &[&[u8]]) = match parts {
            [one] if one.len() >= 64 => (one.get(..64)?, &[]),
            _ => (&[], parts),
        };
        let skip = head.len();
        let mut tail = [0u8; 128];
        let mut len = 0usize;
        let tail_parts = rest.iter().copied().chain(
            parts
                .first()
                .and_then(|p| p.get(skip..))
                .filter(|_| skip > 0),
        );
        for p in tail_parts {
            tail.get_mut(len..len + p.len())
                .filter(|_| skip + len + p.len() <= 119)?
                .copy_from_slice(p);
            len += p.len();
        }
        let tail_blocks = if len <= 55 { 1 } else { 2 };
        let end = tail_blocks * 64;
        *tail.get_mut(len)? = 0x80;
        tail.get_mut(end - 8..end)?
            .copy_from_slice(&(((skip + len) as u64) * 8).to_be_bytes());
        Some(Self {
            head,
            tail,
            tail_blocks,
        })
    }

    fn hash(&self, alg: HashAlg) -> Option<DigestBytes> {
        use sha2::digest::generic_array::GenericArray;
        let tail = self.tail.get(..self.tail_blocks * 64)?;
        let blocks = self.head.chunks_exact(64).chain(tail.chunks_exact(64));
        match alg {
            HashAlg::Sha1 => {
                let mut st = SHA1_H0;
                for b in blocks {
                    sha1::compress(&mut st, std::slice::from_ref(GenericArray::from_slice(b)));
                }
                Some(state_digest(&st))
            }
            HashAlg::Sha256 => {
                let mut st = SHA256_H0;
                for b in blocks {
                    sha2::compress256(&mut st, std::slice::from_ref(GenericArray::from_slice(b)));
                }
                Some(state_digest(&st))
            }
            _ => None,
        }
    }
}

/// The digest a SHA-1 or SHA-256 state (big-endian words) stands for.
fn state_digest(state: &[u32]) -> DigestBytes {
    let state = state.get(..16).unwrap_or(state);
    let mut out = DigestBytes {
        len: (state.len() * 4) as u8,
        buf: [0; 64],
    };
    for (o, w) in out.buf.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// The second block of SHA-256 over exactly 64 bytes: padding only
/// (0x80, zeros, the bit length 512).
const SHA256_PAD_64: [u8; 64] = {
    let mut b = [0u8; 64];
    b[0] = 0x80;
    b[62] = 0x02;
    b
};

/// Extend `pcr` (of `alg`) with `value`.
fn extend(alg: HashAlg, pcr: &DigestBytes, value: &DigestBytes) -> DigestBytes {
    if alg == HashAlg::Sha256 && pcr.len == 32 && value.len == 32 {
        // The common case (one extend per entry): pcr || value is exactly
        // one block, and the second is constant, so nothing is padded.
        use sha2::digest::generic_array::GenericArray;
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&pcr.buf[..32]);
        block[32..].copy_from_slice(&value.buf[..32]);
        let mut st = SHA256_H0;
        sha2::compress256(
            &mut st,
            &[
                *GenericArray::from_slice(&block),
                *GenericArray::from_slice(&SHA256_PAD_64),
            ],
        );
        return state_digest(&st);
    }
    digest(alg, &[pcr.as_slice(), value.as_slice()])
}

fn alg_by_name(name: &[u8]) -> Option<HashAlg> {
    match name {
        b"sha1" => Some(HashAlg::Sha1),
        b"sha256" => Some(HashAlg::Sha256),
        b"sha384" => Some(HashAlg::Sha384),
        b"sha512" => Some(HashAlg::Sha512),
        _ => None,
    }
}

fn alg_by_len(len: usize) -> Option<HashAlg> {
    match len {
        20 => Some(HashAlg::Sha1),
        32 => Some(HashAlg::Sha256),
        48 => Some(HashAlg::Sha384),
        64 => Some(HashAlg::Sha512),
        _ => None,
    }
}

fn push_field(data: &mut Vec<u8>, field: &[u8]) -> Result<(), KeepError> {
    let len = u32::try_from(field.len()).map_err(|_| KeepError::TooLarge)?;
    data.extend_from_slice(&len.to_le_bytes());
    data.extend_from_slice(field);
    Ok(())
}

/// The parsed fields of an entry.
#[derive(Clone, Copy)]
struct Fields<'a> {
    template: Template,
    digest_alg: HashAlg,
    digest: Spelled<'a>,
    name: &'a [u8],
    extra: &'a [u8],
}

/// A digest as bytes, or as the hex digits of an ascii line (of the right
/// length, not yet checked to be digits). Hex is decoded where the bytes
/// are kept: decoded into a local and copied, it was read back before the
/// stores had landed, a stall that cost ~4% of the replay.
#[derive(Clone, Copy)]
enum Spelled<'a> {
    Bytes(&'a [u8]),
    Hex(&'a [u8]),
}

impl Spelled<'_> {
    fn len(self) -> usize {
        match self {
            Self::Bytes(b) => b.len(),
            Self::Hex(h) => h.len() / 2,
        }
    }

    /// Append the bytes to `out`.
    fn push_to(self, out: &mut Vec<u8>) -> Result<(), KeepError> {
        match self {
            Self::Bytes(b) => {
                out.extend_from_slice(b);
                Ok(())
            }
            Self::Hex(h) => push_hex(out, h).ok_or(KeepError::NotHex {
                template_hash: false,
            }),
        }
    }
}

/// Why a parsed line could not be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeepError {
    /// A hex field holds a non-digit: the template hash, or the digest.
    NotHex { template_hash: bool },
    /// The entry is too large to keep.
    TooLarge,
}

fn build_entry(
    line: usize,
    pcr: u32,
    template_hash: DigestBytes,
    f: Fields<'_>,
) -> Result<ImaEntry, KeepError> {
    let mut e = ImaEntry::empty();
    fill_entry(&mut e, line, pcr, template_hash, f)?;
    Ok(e)
}

/// Write the fields into `out`, reusing its data buffer.
fn fill_entry(
    out: &mut ImaEntry,
    line: usize,
    pcr: u32,
    template_hash: DigestBytes,
    f: Fields<'_>,
) -> Result<(), KeepError> {
    let mut data = std::mem::take(&mut out.data);
    data.clear();
    let [d, n, x] = write_template_data(&mut data, &f)?;
    *out = ImaEntry {
        line,
        pcr,
        template_hash,
        template: f.template,
        digest_alg: f.digest_alg,
        data,
        digest: d,
        name: n,
        extra: x,
    };
    Ok(())
}

/// Append the template data of `f` to `data`; the digest, name and extra
/// ranges, counted from where it starts. On error `data` may hold part.
fn write_template_data(data: &mut Vec<u8>, f: &Fields<'_>) -> Result<[Range<usize>; 3], KeepError> {
    let Fields {
        template,
        digest_alg,
        digest,
        name,
        extra,
    } = *f;
    let base = data.len();
    data.reserve(digest.len() + name.len() + extra.len() + 32);
    let (d, n, x);
    if template == Template::Ima {
        digest.push_to(data)?;
        d = base..data.len();
        push_field(data, name)?;
        n = data.len() - name.len()..data.len();
        x = data.len()..data.len();
    } else {
        // d-ng: "<alg>:\0<digest>"; n-ng: name with its NUL.
        let alg = digest_alg.name().as_bytes();
        let flen = u32::try_from(alg.len() + 2 + digest.len()).map_err(|_| KeepError::TooLarge)?;
        data.extend_from_slice(&flen.to_le_bytes());
        data.extend_from_slice(alg);
        data.extend_from_slice(b":\0");
        digest.push_to(data)?;
        d = data.len() - digest.len()..data.len();
        let nlen = u32::try_from(name.len() + 1).map_err(|_| KeepError::TooLarge)?;
        data.extend_from_slice(&nlen.to_le_bytes());
        let start = data.len();
        data.extend_from_slice(name);
        n = start..data.len();
        data.push(0);
        if template.field_count() == 3 {
            push_field(data, extra)?;
            x = data.len() - extra.len()..data.len();
        } else {
            x = data.len()..data.len();
        }
    }
    Ok([d, n, x].map(|r| r.start - base..r.end - base))
}

/// Hex digit values; 0xff marks a non-digit.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Two hex digits (the little-endian `u16` of their ASCII bytes) to the
/// byte they spell; bit 8 set marks a pair that is not two hex digits.
/// One load per byte decoded: twice as fast as converting eight digits at
/// a time in a `u64` (docs/benchmarks.md). 128 KiB, of which the pairs of
/// hex digits touch ~4 KiB.
static HEX_PAIR: [u16; 65536] = {
    let mut t = [0x100u16; 65536];
    let mut i = 0;
    while i < 65536 {
        let (lo, hi) = (HEX_VALUE[i & 0xff], HEX_VALUE[i >> 8]);
        if lo != 0xff && hi != 0xff {
            // The first digit (low byte) is the high nibble.
            t[i] = ((lo as u16) << 4) | hi as u16;
        }
        i += 1;
    }
    t
};

/// Decode hex into an inline digest, a table lookup per two digits.
fn hex_digest(s: &[u8]) -> Option<DigestBytes> {
    if s.len() & 1 == 1 || s.len() > 128 || s.is_empty() {
        return None;
    }
    let mut digest = DigestBytes {
        len: (s.len() / 2) as u8,
        buf: [0u8; 64],
    };
    let mut bad = 0u16;
    for (o, pair) in digest.buf.iter_mut().zip(s.chunks_exact(2)) {
        let v = HEX_PAIR[usize::from(u16::from_le_bytes([pair[0], pair[1]]))];
        bad |= v;
        *o = v as u8;
    }
    (bad & 0x100 == 0).then_some(digest)
}

/// Append the bytes the hex digits `hex` (of even length) spell to `out`;
/// `None`, `out` as it was, if one is not a hex digit.
fn push_hex(out: &mut Vec<u8>, hex: &[u8]) -> Option<()> {
    let start = out.len();
    let mut bad = 0u16;
    out.extend(hex.chunks_exact(2).map(|pair| {
        let v = HEX_PAIR[usize::from(u16::from_le_bytes([pair[0], pair[1]]))];
        bad |= v;
        v as u8
    }));
    if bad & 0x100 != 0 {
        out.truncate(start);
        return None;
    }
    Some(())
}

/// The lines of `input` split at `\n`, exactly as
/// `input.split(|b| *b == b'\n')` gives them (an input ending in `\n` ends
/// with an empty line), searching eight bytes at a time.
fn lines(input: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(input);
    std::iter::from_fn(move || {
        let s = rest?;
        match find_byte(s, b'\n') {
            Some(i) => {
                rest = s.get(i + 1..);
                s.get(..i)
            }
            None => {
                rest = None;
                Some(s)
            }
        }
    })
}

/// The first `byte` in `s`, eight bytes at a time (a byte-by-byte search
/// for the spaces of the 64-digit SHA-256 field was half the line parse).
fn find_byte(s: &[u8], byte: u8) -> Option<usize> {
    let pattern = ONES * u64::from(byte);
    let mut words = s.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let t = u64::from_le_bytes(b) ^ pattern;
        // The lowest flagged byte is the first zero byte (the classic
        // has-zero-byte test errs only above a real zero).
        let z = t.wrapping_sub(ONES) & !t & HIGH;
        if z != 0 {
            return Some(at + (z.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|b| *b == byte)
        .map(|i| at + i)
}

fn split_space(s: &[u8]) -> (&[u8], Option<&[u8]>) {
    match find_byte(s, b' ') {
        Some(i) => (&s[..i], s.get(i + 1..)),
        None => (s, None),
    }
}

/// Parse the ascii list (`ascii_runtime_measurements`). Empty lines are
/// skipped; line numbers in entries and errors are 1-based.
pub fn parse_ascii(input: &[u8]) -> Result<Vec<ImaEntry>, ImaError> {
    parse_ascii_from(input, 1)
}

/// Parse an ascii continuation whose first line is line `first_line` of the
/// whole list.
pub fn parse_ascii_from(input: &[u8], first_line: usize) -> Result<Vec<ImaEntry>, ImaError> {
    // A line is at least ~60 bytes; this bounds the reservation by the input.
    let mut out = Vec::with_capacity(input.len() / 64);
    each_line(input, first_line, |raw, no, entry_no, utf8_checked| {
        out.push(parse_ascii_line(raw, no, entry_no, utf8_checked)?);
        Ok(())
    })?;
    Ok(out)
}

/// Parse an ascii list (or piece, its first line `first_line`) into the
/// compact form the server keeps.
fn parse_ascii_block(input: &[u8], first_line: usize) -> Result<(EntryBlock, usize), ImaError> {
    let mut block = EntryBlock::with_capacity(input.len());
    let newlines = each_line(input, first_line, |raw, no, entry_no, utf8_checked| {
        parse_ascii_line_with(raw, no, entry_no, utf8_checked, |pcr, th, fields| {
            block.push(no, pcr, th, &fields)
        })
    })?;
    Ok((block, newlines))
}

/// Call `entry(line, line number, entry number, utf8_checked)` for each
/// non-empty line of `input` (numbered from `first_line`; entries from 1;
/// a trailing `\r` cut), stopping at the first error or over-long line.
/// `utf8_checked`: the whole input is UTF-8, so each line is. Returns the
/// newlines seen (the next input's first line is that many on).
fn each_line(
    input: &[u8],
    first_line: usize,
    mut entry: impl FnMut(&[u8], usize, usize, bool) -> Result<(), ImaError>,
) -> Result<usize, ImaError> {
    // '\n' is ASCII, so the input is UTF-8 exactly when every line is; one
    // check of the whole input spares one per line (a line is still checked
    // alone when the whole is not, so the error names it).
    let utf8_checked = input.is_ascii() || std::str::from_utf8(input).is_ok();
    let mut newlines = 0;
    let mut entries = 0;
    for (no, raw) in (first_line..).zip(lines(input)) {
        newlines = no - first_line;
        if raw.len() > MAX_ASCII_LINE {
            return Err(ImaError::LineTooLong {
                line: no,
                len: raw.len(),
                max: MAX_ASCII_LINE,
            });
        }
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        entries += 1;
        entry(raw, no, entries, utf8_checked)?;
    }
    Ok(newlines)
}

fn parse_ascii_line(
    raw: &[u8],
    line: usize,
    entry: usize,
    utf8_checked: bool,
) -> Result<ImaEntry, ImaError> {
    let mut e = ImaEntry::empty();
    parse_ascii_line_into(raw, line, entry, &mut e, utf8_checked)?;
    Ok(e)
}

fn parse_ascii_line_into(
    raw: &[u8],
    line: usize,
    entry: usize,
    out: &mut ImaEntry,
    utf8_checked: bool,
) -> Result<(), ImaError> {
    parse_ascii_line_with(raw, line, entry, utf8_checked, |pcr, th, fields| {
        let th = match th {
            Spelled::Bytes(b) => DigestBytes::from_slice(b),
            Spelled::Hex(h) => hex_digest(h),
        };
        let th = th.ok_or(KeepError::NotHex {
            template_hash: true,
        })?;
        fill_entry(out, line, pcr, th, fields)
    })
}

/// Parse one line and hand its PCR, template hash and fields to `keep`
/// (which fails only on an entry too large to keep).
fn parse_ascii_line_with(
    raw: &[u8],
    line: usize,
    entry: usize,
    utf8_checked: bool,
    keep: impl FnOnce(u32, Spelled<'_>, Fields<'_>) -> Result<(), KeepError>,
) -> Result<(), ImaError> {
    let bad = |field: &'static str, detail: &str| ImaError::Malformed {
        line,
        field,
        detail: detail.to_string(),
    };
    if !utf8_checked && std::str::from_utf8(raw).is_err() {
        return Err(ImaError::NotUtf8 { line });
    }
    let (pcr, rest) = split_space(raw);
    let pcr: u32 = std::str::from_utf8(pcr)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("pcr", "not a decimal number"))?;
    let rest = rest.ok_or_else(|| bad("template hash", "missing"))?;
    let (th, rest) = split_space(rest);
    const TH_NOT_HEX: &str = "not a 20/32/48/64-byte hex digest";
    // Hex fields are checked to be digits as they are decoded, by `keep`.
    if th.len() % 2 == 1 || alg_by_len(th.len() / 2).is_none() {
        return Err(bad("template hash", TH_NOT_HEX));
    }
    let rest = rest.ok_or_else(|| bad("template name", "missing"))?;
    let (tname, rest) = split_space(rest);
    let template = Template::parse(tname).ok_or_else(|| ImaError::UnsupportedTemplate {
        entry,
        line,
        name: String::from_utf8_lossy(tname).into_owned(),
    })?;
    let rest = rest.ok_or_else(|| bad("digest", "missing"))?;
    let (dfield, rest) = split_space(rest);
    let (digest_alg, digest) = if template == Template::Ima {
        if dfield.len() != 40 {
            return Err(bad("digest", "not a 20-byte hex digest"));
        }
        (HashAlg::Sha1, dfield)
    } else {
        let colon = dfield
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| bad("digest", "no \"alg:\" prefix"))?;
        let (an, hx) = (
            &dfield[..colon],
            dfield.get(colon + 1..).unwrap_or_default(),
        );
        let alg = alg_by_name(an).ok_or_else(|| ImaError::UnsupportedAlgorithm {
            entry,
            line,
            name: String::from_utf8_lossy(an).into_owned(),
        })?;
        if hx.len() != 2 * alg.digest_len() {
            return Err(bad("digest", "hex of the wrong length for its algorithm"));
        }
        (alg, hx)
    };
    let rest = rest.ok_or_else(|| bad("name", "missing"))?;
    let (name, extra): (&[u8], Vec<u8>) = match template {
        Template::Ima | Template::ImaNg => (rest, Vec::new()),
        Template::ImaSig | Template::ImaBuf => {
            // The last field follows the last space; a file name may hold spaces.
            match rest.iter().rposition(|b| *b == b' ') {
                Some(i) => {
                    let (n, h) = (&rest[..i], rest.get(i + 1..).unwrap_or_default());
                    match hex::decode(h) {
                        Ok(x) => (n, x),
                        // Trailing space stripped and a name with spaces.
                        Err(_) if template == Template::ImaSig => (rest, Vec::new()),
                        Err(_) => return Err(bad("buf", "not hex")),
                    }
                }
                None => (rest, Vec::new()),
            }
        }
    };
    if name.is_empty() {
        return Err(bad("name", "empty"));
    }
    if template == Template::Ima && name.len() >= IMA_NAME_HASH_LEN {
        return Err(bad("name", "longer than 255 bytes in an `ima` entry"));
    }
    let fields = Fields {
        template,
        digest_alg,
        digest: Spelled::Hex(digest),
        name,
        extra: &extra,
    };
    keep(pcr, Spelled::Hex(th), fields).map_err(|e| match e {
        KeepError::NotHex {
            template_hash: true,
        } => bad("template hash", TH_NOT_HEX),
        KeepError::NotHex {
            template_hash: false,
        } if template == Template::Ima => bad("digest", "not a 20-byte hex digest"),
        KeepError::NotHex {
            template_hash: false,
        } => bad("digest", "not hex"),
        KeepError::TooLarge => bad("entry", "too large"),
    })
}

/// Bounds-checked little-endian reader for the binary list.
struct BinReader<'a> {
    buf: &'a [u8],
    pos: usize,
    entry: usize,
}

impl<'a> BinReader<'a> {
    fn bytes(&mut self, n: usize, structure: &'static str) -> Result<&'a [u8], ImaError> {
        let remaining = self.buf.len().saturating_sub(self.pos);
        if remaining < n {
            return Err(ImaError::Truncated {
                entry: self.entry,
                structure,
                offset: self.pos,
                needed: n - remaining,
            });
        }
        let out = self.buf.get(self.pos..self.pos + n).unwrap_or_default();
        self.pos += n;
        Ok(out)
    }
    fn u32(&mut self, structure: &'static str) -> Result<u32, ImaError> {
        let b = self.bytes(4, structure)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn sized(&mut self, structure: &'static str) -> Result<&'a [u8], ImaError> {
        let n = self.u32(structure)? as usize;
        self.bytes(n, structure)
    }
}

/// Parse the binary list (`binary_runtime_measurements`, little-endian).
pub fn parse_binary(input: &[u8]) -> Result<Vec<ImaEntry>, ImaError> {
    // An entry has at least 4+20+4+4 bytes of header.
    let mut out = Vec::with_capacity(input.len() / 32);
    let mut r = BinReader {
        buf: input,
        pos: 0,
        entry: 1,
    };
    while r.pos < input.len() {
        let start = r.pos;
        let pcr = r.u32("pcr")?;
        let th = r.bytes(20, "template hash")?;
        let template_hash = DigestBytes::from_slice(th).unwrap_or(DigestBytes::filled(20, 0));
        let tlen = r.u32("template name length")? as usize;
        if tlen > MAX_TEMPLATE_NAME {
            return Err(ImaError::BinaryMalformed {
                entry: r.entry,
                offset: r.pos - 4,
                field: "template name length",
                detail: format!("{tlen} > {MAX_TEMPLATE_NAME}"),
            });
        }
        let tname = r.bytes(tlen, "template name")?;
        let template = Template::parse(tname).ok_or_else(|| ImaError::UnsupportedTemplate {
            entry: r.entry,
            line: start,
            name: String::from_utf8_lossy(tname).into_owned(),
        })?;
        let entry = if template == Template::Ima {
            let data_start = r.pos;
            r.bytes(20, "ima digest")?;
            let n = r.sized("ima name")?;
            if n.len() >= IMA_NAME_HASH_LEN {
                return Err(ImaError::BinaryMalformed {
                    entry: r.entry,
                    offset: data_start + 20,
                    field: "ima name",
                    detail: "longer than 255 bytes".into(),
                });
            }
            let data = input.get(data_start..r.pos).unwrap_or_default().to_vec();
            ImaEntry {
                line: start,
                pcr,
                template_hash,
                template,
                digest_alg: HashAlg::Sha1,
                data,
                digest: 0..20,
                name: 24..24 + n.len(),
                extra: 24 + n.len()..24 + n.len(),
            }
        } else {
            let data = r.sized("template data")?;
            let data_offset = r.pos - data.len();
            parse_ng_data(
                data,
                data_offset,
                r.entry,
                start,
                pcr,
                template_hash,
                template,
            )?
        };
        out.push(entry);
        r.entry += 1;
    }
    Ok(out)
}

/// Split the template data of an `-ng` template into its fields.
fn parse_ng_data(
    data: &[u8],
    data_offset: usize,
    entry: usize,
    start: usize,
    pcr: u32,
    template_hash: DigestBytes,
    template: Template,
) -> Result<ImaEntry, ImaError> {
    let mut f = BinReader {
        buf: data,
        pos: 0,
        entry,
    };
    let malformed =
        |offset: usize, field: &'static str, detail: String| ImaError::BinaryMalformed {
            entry,
            offset: data_offset + offset,
            field,
            detail,
        };
    let d_start = f.pos + 4;
    let dng = f.sized("d-ng field")?;
    let sep = dng
        .windows(2)
        .position(|w| w == b":\0")
        .ok_or_else(|| malformed(d_start, "d-ng", "no \"alg:\\0\" prefix".into()))?;
    let alg_name = dng.get(..sep).unwrap_or_default();
    let digest_alg = alg_by_name(alg_name).ok_or_else(|| ImaError::UnsupportedAlgorithm {
        entry,
        line: start,
        name: String::from_utf8_lossy(alg_name).into_owned(),
    })?;
    let digest = d_start + sep + 2..d_start + dng.len();
    if digest.len() != digest_alg.digest_len() {
        return Err(malformed(
            d_start,
            "d-ng",
            format!("{} bytes of {digest_alg} digest", digest.len()),
        ));
    }
    let n_start = f.pos + 4;
    let n = f.sized("n-ng field")?;
    // n-ng ends with NUL, which is not part of the name.
    let name_len = match n.last() {
        Some(0) => n.len() - 1,
        _ => n.len(),
    };
    let name = n_start..n_start + name_len;
    let extra = if template.field_count() == 3 {
        let x_start = f.pos + 4;
        let x = f.sized("third field")?;
        x_start..x_start + x.len()
    } else {
        f.pos..f.pos
    };
    if f.pos != data.len() {
        return Err(malformed(
            f.pos,
            "template data",
            format!("{} trailing bytes", data.len() - f.pos),
        ));
    }
    Ok(ImaEntry {
        line: start,
        pcr,
        template_hash,
        template,
        digest_alg,
        data: data.to_vec(),
        digest,
        name,
        extra,
    })
}

/// Encode entries as a binary list (little-endian), the inverse of
/// [`parse_binary`]; used by tests, benches and tooling.
pub fn encode_binary(entries: &[ImaEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.pcr.to_le_bytes());
        let mut th = [0u8; 20];
        let src = e.template_hash.as_slice();
        let n = src.len().min(20);
        th[..n].copy_from_slice(&src[..n]);
        out.extend_from_slice(&th);
        let name = e.template.name().as_bytes();
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name);
        if e.template != Template::Ima {
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(&e.data);
    }
    out
}

/// Encode entries as an ascii list that [`parse_ascii`] reads back to the
/// same entries. The parser drops one `\r` before each line's newline (CRLF
/// lists), so a line whose last field ends in `\r` gets one more.
pub fn encode_ascii(entries: &[ImaEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        out.push_str(&format!(
            "{} {} {} ",
            e.pcr,
            hex::encode(e.template_hash.as_slice()),
            e.template.name()
        ));
        if e.template == Template::Ima {
            out.push_str(&hex::encode(e.digest()));
        } else {
            out.push_str(e.digest_alg.name());
            out.push(':');
            out.push_str(&hex::encode(e.digest()));
        }
        out.push(' ');
        out.push_str(&e.name());
        if e.template.field_count() == 3 {
            out.push(' ');
            out.push_str(&hex::encode(e.extra()));
        }
        if out.ends_with('\r') {
            out.push('\r');
        }
        out.push('\n');
    }
    out
}

/// Make an entry from its fields, computing the SHA-1 template hash as the
/// kernel would; for generators and tests.
pub fn make_entry(
    template: Template,
    digest_alg: HashAlg,
    digest: &[u8],
    name: &str,
    extra: &[u8],
) -> Option<ImaEntry> {
    if digest.len() != digest_alg.digest_len() {
        return None;
    }
    let fields = Fields {
        template,
        digest_alg,
        digest: Spelled::Bytes(digest),
        name: name.as_bytes(),
        extra,
    };
    let mut e = build_entry(0, 10, DigestBytes::filled(20, 0), fields).ok()?;
    e.template_hash = e.compute_template_hash(HashAlg::Sha1);
    Some(e)
}

/// PCR 10 replayed from zero over `entries` with `bank`.
pub fn replay(entries: &[ImaEntry], bank: HashAlg) -> Vec<u8> {
    let mut pcr = DigestBytes::filled(bank.digest_len(), 0);
    for e in entries {
        pcr = extend(bank, &pcr, &e.template_hash_for(bank));
    }
    pcr.as_slice().to_vec()
}

/// One bank's replayed PCR 10.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankValue {
    pub bank: HashAlg,
    #[serde(with = "hex_bytes")]
    pub pcr10: Vec<u8>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// What the server keeps per host between attestations: where the replay
/// stands, how many entries are behind it, and which boot it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImaState {
    /// Identifies the boot (the agent's boot id), if known.
    pub boot_id: Option<String>,
    /// The TPM's resetCount from the quote's clockInfo, if known.
    pub reset_count: Option<u32>,
    pub entries_verified: u64,
    pub banks: Vec<BankValue>,
}

/// The quoted PCR 10 is not what the list replays to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("PCR 10 ({bank}): quoted {quoted}, list replays to {replayed}")]
pub struct Pcr10Mismatch {
    pub bank: HashAlg,
    pub quoted: String,
    pub replayed: String,
}

impl ImaState {
    /// The state of a fresh boot: PCR 10 all zeros in each bank.
    pub fn new(boot_id: Option<String>, reset_count: Option<u32>, banks: &[HashAlg]) -> Self {
        let mut s = Self {
            boot_id,
            reset_count,
            entries_verified: 0,
            banks: Vec::new(),
        };
        for b in banks {
            s.ensure_bank(*b);
        }
        s
    }

    /// The state to verify a quote from: `previous` if it belongs to the
    /// same boot, else a fresh one (a reboot starts the list over).
    pub fn for_boot(
        previous: Option<&ImaState>,
        boot_id: Option<&str>,
        reset_count: Option<u32>,
        banks: &[HashAlg],
    ) -> Self {
        match previous {
            Some(p)
                if p.boot_id.as_deref() == boot_id
                    && p.reset_count == reset_count
                    && banks.iter().all(|b| p.pcr10(*b).is_some()) =>
            {
                p.clone()
            }
            _ => Self::new(boot_id.map(str::to_string), reset_count, banks),
        }
    }

    fn ensure_bank(&mut self, bank: HashAlg) {
        if self.pcr10(bank).is_none() {
            self.banks.push(BankValue {
                bank,
                pcr10: vec![0; bank.digest_len()],
            });
        }
    }

    pub fn pcr10(&self, bank: HashAlg) -> Option<&[u8]> {
        self.banks
            .iter()
            .find(|b| b.bank == bank)
            .map(|b| b.pcr10.as_slice())
    }

    /// The entries of the whole list `all` not yet verified.
    pub fn continuation<'a>(&self, all: &'a [ImaEntry]) -> Result<&'a [ImaEntry], ImaError> {
        usize::try_from(self.entries_verified)
            .ok()
            .and_then(|n| all.get(n..))
            .ok_or(ImaError::ListShrank {
                len: all.len(),
                verified: self.entries_verified,
            })
    }

    /// Does the replayed PCR 10 of `bank` equal the quoted value?
    pub fn matches_quote(&self, bank: HashAlg, quoted: &[u8]) -> Result<(), Pcr10Mismatch> {
        let replayed = self.pcr10(bank).unwrap_or_default();
        if replayed == quoted {
            return Ok(());
        }
        Err(Pcr10Mismatch {
            bank,
            quoted: hex::encode(quoted),
            replayed: hex::encode(replayed),
        })
    }
}

/// Why an entry failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The logged template hash is not the hash of the template data.
    TemplateHashMismatch,
    /// The path is neither in the policy nor excluded.
    NotInPolicy,
    /// The path is in the policy with other digests.
    DigestMismatch,
    /// A violation entry (open-writers / ToMToU) and the policy forbids them.
    Violation,
    /// ima-sig: the signature did not verify and no digest allowed the file.
    SignatureInvalid,
    /// Not PCR 10.
    UnexpectedPcr,
}

/// One failing entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImaFailure {
    /// 1-based position in the whole list (counting earlier verified entries).
    pub index: u64,
    /// Ascii line number, or the byte offset in a binary list.
    pub line: usize,
    pub path: String,
    pub code: FailureCode,
    /// Allowed digests (at most a few), `alg:hex`.
    pub expected: Vec<String>,
    /// What the entry carries, `alg:hex`.
    pub actual: Option<String>,
}

/// Result of verifying a run of entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImaOutcome {
    pub new_state: ImaState,
    pub entries_checked: u64,
    /// The first failures, at most [`MAX_REPORTED_FAILURES`].
    pub failures: Vec<ImaFailure>,
    pub failures_total: u64,
}

impl ImaOutcome {
    pub fn ok(&self) -> bool {
        self.failures_total == 0
    }
}

/// Verify `entries` (the continuation after `state`) against `policy`,
/// replaying PCR 10 in `bank` and in every bank `state` already tracks.
/// The logged (SHA-1) template hash of each entry is checked against its
/// data so a failure names the altered line.
pub fn verify(
    entries: &[ImaEntry],
    policy: &RuntimePolicy,
    state: &ImaState,
    bank: HashAlg,
) -> Result<ImaOutcome, PolicyError> {
    Ok(verify_compiled(entries, policy.compiled()?, state, bank))
}

/// A list (or continuation) replayed from a stored state to the quote: the
/// entries the quote covers, each template hash recomputed once. The
/// server's log step makes it; its whitelist step judges it against each
/// runtime policy with [`judge_replayed`], which hashes nothing again.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The entries the quote covers, in list order.
    entries: EntryList,
    /// The state before them.
    pub start: ImaState,
    /// The state after them: each quoted bank at its quoted value.
    pub end: ImaState,
    /// Positions in `entries` whose data does not hash to their logged
    /// template hash, in order.
    mismatched: Vec<usize>,
}

/// No entry of the list brings every quoted bank's PCR 10 to its quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayMismatch {
    /// The first quoted bank.
    pub bank: HashAlg,
    pub quoted: Vec<u8>,
    /// That bank's PCR 10 before the list, and after all of it.
    pub replayed_from: Vec<u8>,
    pub replayed: Vec<u8>,
    /// Entries in the list.
    pub entries: usize,
    /// The first entry whose data does not hash to its logged template
    /// hash: where the list was most likely altered (none when whoever
    /// altered it also rewrote the logged hash, or dropped or reordered
    /// entries).
    pub altered: Option<Box<AlteredEntry>>,
}

/// An entry whose template data does not hash to its logged template hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {index} (line {line}, {path}) is not what its logged template hash says: its data hashes to {alg}:{}, the log says {alg}:{}", hex::encode(.computed), hex::encode(.logged))]
pub struct AlteredEntry {
    /// 1-based position in the whole list.
    pub index: u64,
    pub line: usize,
    pub path: String,
    pub alg: HashAlg,
    pub logged: Vec<u8>,
    pub computed: Vec<u8>,
}

impl Replayed {
    /// No new entries: `state` is both start and end.
    pub fn unchanged(state: ImaState) -> Self {
        Self {
            entries: EntryList::default(),
            end: state.clone(),
            start: state,
            mismatched: Vec::new(),
        }
    }

    /// The number of entries the quote covers.
    pub fn len(&self) -> usize {
        self.entries.len
    }
    pub fn is_empty(&self) -> bool {
        self.entries.len == 0
    }
    /// Entry `i` (0-based) of those the quote covers.
    pub fn entry(&self, i: usize) -> Option<EntryRef<'_>> {
        self.entries.get(i)
    }
    /// The entries the quote covers, in list order.
    pub fn entries(&self) -> impl Iterator<Item = EntryRef<'_>> + '_ {
        self.entries.range(0, self.entries.len)
    }
}

/// Equal states, and entries equal one by one (however they are stored).
impl PartialEq for Replayed {
    fn eq(&self, other: &Self) -> bool {
        self.start == other.start
            && self.end == other.end
            && self.mismatched == other.mismatched
            && self.len() == other.len()
            && self.entries().eq(other.entries())
    }
}

impl Eq for Replayed {}

/// Entries kept compactly: each one's logged template hash and template
/// data back to back in one buffer, and a fixed-size record of where.
/// A list costs no allocation per entry and ~60% of the memory of
/// [`ImaEntry`]s (~150 bytes an entry for a typical `ima-ng` line). With
/// `ImaEntry`s, allocating, freeing and faulting in fresh pages were ~30%
/// of the server's steps' profile; ~8% now (docs/benchmarks.md).
#[derive(Debug, Clone, Default)]
struct EntryBlock {
    bytes: Vec<u8>,
    slots: Vec<Slot>,
    /// Added to every slot's line (a piece is parsed as if it began the
    /// list, then placed).
    line_base: usize,
}

/// Where an [`EntryBlock`] keeps one entry: its template hash at
/// `start`, then its template data. Offsets in the data are `u32`: a
/// binary list gives the data's length as a `u32`, an ascii line is at
/// most [`MAX_ASCII_LINE`] (longer data could only come from
/// [`make_entry`], and would be kept as empty).
#[derive(Debug, Clone)]
struct Slot {
    line: usize,
    start: usize,
    data_len: u32,
    /// Digest, name and extra: (start, end) in the template data.
    fields: [(u32, u32); 3],
    pcr: u32,
    hash_len: u8,
    template: Template,
    digest_alg: HashAlg,
}

impl Slot {
    fn new(
        line: usize,
        start: usize,
        hash_len: usize,
        data_len: usize,
        fields: [Range<usize>; 3],
    ) -> Self {
        let narrow = |x: usize| u32::try_from(x).unwrap_or(0);
        Self {
            line,
            start,
            data_len: narrow(data_len),
            fields: fields.map(|r| (narrow(r.start), narrow(r.end))),
            pcr: 0,
            hash_len: u8::try_from(hash_len).unwrap_or(0),
            template: Template::ImaNg,
            digest_alg: HashAlg::Sha1,
        }
    }
}

impl EntryBlock {
    /// Room for the entries of `text_len` bytes of ascii list, at most
    /// (template data is shorter than its line, whose hex fields it holds
    /// as bytes; a line is at least ~60 bytes). Pages reserved and never
    /// written cost no memory.
    fn with_capacity(text_len: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(text_len),
            slots: Vec::with_capacity(text_len / 64),
            line_base: 0,
        }
    }

    fn push(
        &mut self,
        line: usize,
        pcr: u32,
        th: Spelled<'_>,
        f: &Fields<'_>,
    ) -> Result<(), KeepError> {
        let start = self.bytes.len();
        let kept = th
            .push_to(&mut self.bytes)
            .map_err(|_| KeepError::NotHex {
                template_hash: true,
            })
            .and_then(|()| {
                let data = self.bytes.len();
                let fields = write_template_data(&mut self.bytes, f)?;
                let data_len = self.bytes.len() - data;
                if data_len > u32::MAX as usize {
                    return Err(KeepError::TooLarge);
                }
                Ok((data - start, data_len, fields))
            });
        match kept {
            Ok((hash_len, data_len, fields)) => {
                self.slots.push(Slot {
                    pcr,
                    template: f.template,
                    digest_alg: f.digest_alg,
                    ..Slot::new(line, start, hash_len, data_len, fields)
                });
                Ok(())
            }
            Err(e) => {
                self.bytes.truncate(start);
                Err(e)
            }
        }
    }

    fn push_entry(&mut self, e: &ImaEntry) {
        let start = self.bytes.len();
        let th = e.template_hash.as_slice();
        self.bytes.extend_from_slice(th);
        self.bytes.extend_from_slice(&e.data);
        let fields = [e.digest.clone(), e.name.clone(), e.extra.clone()];
        self.slots.push(Slot {
            pcr: e.pcr,
            template: e.template,
            digest_alg: e.digest_alg,
            ..Slot::new(e.line, start, th.len(), e.data.len(), fields)
        });
    }

    fn get(&self, i: usize) -> Option<EntryRef<'_>> {
        let s = self.slots.get(i)?;
        let data = s.start + usize::from(s.hash_len);
        let end = data + s.data_len as usize;
        Some(EntryRef::new(
            s.line.saturating_add(self.line_base),
            s.pcr,
            s.template,
            s.digest_alg,
            self.bytes.get(s.start..data).unwrap_or_default(),
            self.bytes.get(data..end).unwrap_or_default(),
            s.fields.map(|(a, b)| (a as usize, b as usize)),
        ))
    }

    /// Entries `from..`, in order.
    fn views(&self, from: usize) -> impl Iterator<Item = EntryRef<'_>> + Clone + '_ {
        (from..self.slots.len()).filter_map(|i| self.get(i))
    }

    fn truncate(&mut self, len: usize) {
        if let Some(s) = self.slots.get(len) {
            self.bytes.truncate(s.start);
        }
        self.slots.truncate(len);
    }
}

/// A list as the blocks it was parsed in (pieces are never copied
/// together), indexed as one.
#[derive(Debug, Clone, Default)]
struct EntryList {
    blocks: Vec<EntryBlock>,
    /// The index of each block's first entry.
    firsts: Vec<usize>,
    len: usize,
}

impl EntryList {
    fn push(&mut self, block: EntryBlock) {
        self.firsts.push(self.len);
        self.len += block.slots.len();
        self.blocks.push(block);
    }

    /// The block holding entry `i`, and `i`'s place in it.
    fn locate(&self, i: usize) -> (usize, usize) {
        let k = self.firsts.partition_point(|f| *f <= i).saturating_sub(1);
        (
            k,
            i.saturating_sub(self.firsts.get(k).copied().unwrap_or(0)),
        )
    }

    fn get(&self, i: usize) -> Option<EntryRef<'_>> {
        let (k, at) = self.locate(i);
        self.blocks.get(k)?.get(at)
    }

    /// Entries `from..to`, in order.
    fn range(&self, from: usize, to: usize) -> impl Iterator<Item = EntryRef<'_>> + Clone + '_ {
        let (k, at) = self.locate(from);
        let blocks = self.blocks.get(k..).unwrap_or_default();
        blocks
            .iter()
            .enumerate()
            .flat_map(move |(j, b)| b.views(if j == 0 { at } else { 0 }))
            .take(to.saturating_sub(from))
    }

    fn truncate(&mut self, len: usize) {
        let keep = self.firsts.partition_point(|f| *f < len);
        self.blocks.truncate(keep);
        self.firsts.truncate(keep);
        if let (Some(b), Some(first)) = (self.blocks.last_mut(), self.firsts.last()) {
            b.truncate(len - first);
        }
        self.len = self.len.min(len);
    }
}

/// Why an ascii list was not replayed to the quote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayFailure {
    #[error("{0}")]
    Parse(#[from] ImaError),
    #[error("PCR 10 ({}) never reaches the quote", .0.bank)]
    Mismatch(ReplayMismatch),
}

/// Replay `entries` (the continuation after `start`) in every bank of
/// `quoted` (bank, quoted PCR 10) and keep the shortest prefix, maybe
/// empty, after which every bank equals its quote: the list is read after
/// the quote, so it may run past it. Banks `start` lacks start at zero.
pub fn replay_to_quote(
    entries: Vec<ImaEntry>,
    start: &ImaState,
    quoted: &[(HashAlg, &[u8])],
) -> Result<Replayed, ReplayMismatch> {
    let mut block = EntryBlock::default();
    for e in &entries {
        block.push_entry(e);
    }
    replay_block(block, start, quoted)
}

/// [`replay_to_quote`] of one block.
fn replay_block(
    block: EntryBlock,
    start: &ImaState,
    quoted: &[(HashAlg, &[u8])],
) -> Result<Replayed, ReplayMismatch> {
    let banks: Vec<HashAlg> = quoted.iter().map(|(b, _)| *b).collect();
    let mut chain = Chain::new(start, quoted);
    // Entries past the quote are dropped: no need to hash them.
    let mismatched = if chain.covered.is_some() {
        Vec::new()
    } else {
        hash_block(&block, &banks, |h| {
            chain.feed(h);
            chain.covered.is_none()
        })
    };
    let mut list = EntryList::default();
    list.push(block);
    chain.finish(list, mismatched)
}

/// [`parse_ascii_from`] then [`replay_to_quote`], with the parsing and
/// hashing of a list of [`PARALLEL_MIN_BYTES`] or more spread over up to
/// [`parallel_threads`]`(max_threads)` threads (pieces of ~128 KiB cut at
/// line boundaries); the extend chain takes the pieces in list order as
/// they complete. The result, or the first bad line's error with its
/// numbers, is the same.
pub fn replay_ascii_to_quote(
    input: &[u8],
    first_line: usize,
    start: &ImaState,
    quoted: &[(HashAlg, &[u8])],
    max_threads: usize,
) -> Result<Replayed, ReplayFailure> {
    let threads = parallel_threads(max_threads);
    if threads < 2 || input.len() < PARALLEL_MIN_BYTES {
        let (block, _) = parse_ascii_block(input, first_line)?;
        return replay_block(block, start, quoted).map_err(ReplayFailure::Mismatch);
    }
    replay_ascii_pieces(input, first_line, start, quoted, threads, PIECE_BYTES)
}

/// [`replay_ascii_to_quote`] on exactly `threads` threads with pieces of
/// `piece_bytes`, whatever the list's size; for tests and benches.
#[doc(hidden)]
pub fn replay_ascii_pieces(
    input: &[u8],
    first_line: usize,
    start: &ImaState,
    quoted: &[(HashAlg, &[u8])],
    threads: usize,
    piece_bytes: usize,
) -> Result<Replayed, ReplayFailure> {
    let banks: Vec<HashAlg> = quoted.iter().map(|(b, _)| *b).collect();
    let ranges = split_lines(input, piece_bytes);
    let mut chain = Chain::new(start, quoted);
    type Parsed = (EntryBlock, Hashed, usize);
    let mut pieces: Vec<Result<Parsed, ImaError>> = Vec::with_capacity(ranges.len());
    // Each piece parsed as if it began the list (line 0, entry 1), then
    // placed in order; the chain stops at the first bad piece.
    on_threads(
        ranges.len(),
        threads,
        |i| {
            let text = ranges
                .get(i)
                .and_then(|r| input.get(r.clone()))
                .unwrap_or_default();
            let (block, newlines) = parse_ascii_block(text, 0)?;
            let hashed = Hashed::of(&block, &banks);
            Ok((block, hashed, newlines))
        },
        |mut p| {
            let whole = pieces.iter().all(Result::is_ok);
            if let (true, Ok((_, hashed, _))) = (whole, &mut p) {
                chain.feed(&hashed.hashes);
                hashed.hashes = Vec::new();
            }
            pieces.push(p);
        },
    );
    let mut list = EntryList::default();
    let mut mismatched = Vec::new();
    let mut line = first_line;
    for piece in pieces {
        let (mut block, hashed, newlines) = piece.map_err(|e| shift_error(e, line, list.len))?;
        mismatched.extend(hashed.mismatched.iter().map(|i| list.len + i));
        block.line_base = line;
        list.push(block);
        line = line.saturating_add(newlines);
    }
    chain
        .finish(list, mismatched)
        .map_err(ReplayFailure::Mismatch)
}

/// A block's template hashes (per entry, one per bank).
#[derive(Debug, Default)]
struct Hashed {
    hashes: Vec<DigestBytes>,
    /// Positions whose data does not hash to their logged template hash.
    mismatched: Vec<usize>,
}

impl Hashed {
    fn of(block: &EntryBlock, banks: &[HashAlg]) -> Self {
        let mut hashes = Vec::with_capacity(block.slots.len() * banks.len());
        let mismatched = hash_block(block, banks, |h| {
            hashes.extend_from_slice(h);
            true
        });
        Self { hashes, mismatched }
    }
}

/// Hash a block's entries in rounds of [`STREAM_CHUNK`] (one buffer of
/// template hashes, reused), handing each round's (per entry, one per bank
/// of `banks`) to `sink` until it returns false. Returns the positions of
/// the entries hashed whose data does not hash to their logged template
/// hash, among those whose logged hash is of a bank
/// ([`LoggedCheck::InBanks`]).
fn hash_block(
    block: &EntryBlock,
    banks: &[HashAlg],
    mut sink: impl FnMut(&[DigestBytes]) -> bool,
) -> Vec<usize> {
    let mut hashes = Vec::with_capacity(STREAM_CHUNK * banks.len());
    let mut mismatched = Vec::new();
    let mut first = 0;
    while first < block.slots.len() {
        let end = (first + STREAM_CHUNK).min(block.slots.len());
        hashes.clear();
        let round = (first..end).filter_map(|i| block.get(i));
        hash_entries(
            round,
            banks,
            LoggedCheck::InBanks,
            &mut hashes,
            |i, _, _, _| {
                mismatched.push(first + i);
            },
        );
        first = end;
        if !sink(&hashes) {
            break;
        }
    }
    mismatched
}

/// PCR 10 extended from a stored state in each quoted bank, entry by entry,
/// until every bank equals its quote.
struct Chain<'q> {
    quoted: &'q [(HashAlg, &'q [u8])],
    start: ImaState,
    pcrs: Vec<DigestBytes>,
    /// Entries extended so far.
    seen: usize,
    /// Entries after which every bank was at its quote.
    covered: Option<usize>,
}

impl<'q> Chain<'q> {
    fn new(start: &ImaState, quoted: &'q [(HashAlg, &'q [u8])]) -> Self {
        let mut start = start.clone();
        for (b, _) in quoted {
            start.ensure_bank(*b);
        }
        let pcrs = quoted
            .iter()
            .map(|(b, _)| {
                DigestBytes::from_slice(start.pcr10(*b).unwrap_or_default())
                    .unwrap_or(DigestBytes::filled(0, 0))
            })
            .collect();
        let mut chain = Self {
            quoted,
            start,
            pcrs,
            seen: 0,
            covered: None,
        };
        if chain.reached() {
            chain.covered = Some(0);
        }
        chain
    }

    fn reached(&self) -> bool {
        // Asked after every extend: the first eight bytes settle nearly
        // every answer without a call to memcmp (3% of the replay).
        self.quoted.iter().zip(&self.pcrs).all(|((_, q), p)| {
            p.as_slice().first_chunk::<8>() == q.first_chunk::<8>() && p.as_slice() == *q
        })
    }

    /// Extend with the next entries' template hashes (per entry, one per
    /// quoted bank, in `quoted`'s order).
    fn feed(&mut self, hashes: &[DigestBytes]) {
        if self.covered.is_some() || self.quoted.is_empty() {
            return;
        }
        for row in hashes.chunks_exact(self.quoted.len()) {
            for (((alg, _), pcr), th) in self.quoted.iter().zip(self.pcrs.iter_mut()).zip(row) {
                *pcr = extend(*alg, pcr, th);
            }
            self.seen += 1;
            if self.reached() {
                self.covered = Some(self.seen);
                return;
            }
        }
    }

    /// The covered prefix of `entries` (every entry fed), or the mismatch.
    fn finish(
        self,
        mut entries: EntryList,
        mut mismatched: Vec<usize>,
    ) -> Result<Replayed, ReplayMismatch> {
        let Self {
            quoted,
            start,
            pcrs,
            covered,
            ..
        } = self;
        let Some(covered) = covered else {
            let (bank, q) = quoted.first().copied().unwrap_or((HashAlg::Sha256, &[]));
            return Err(ReplayMismatch {
                altered: first_altered(&entries, start.entries_verified),
                bank,
                quoted: q.to_vec(),
                replayed_from: start.pcr10(bank).unwrap_or_default().to_vec(),
                replayed: pcrs
                    .first()
                    .map(|p| p.as_slice().to_vec())
                    .unwrap_or_default(),
                entries: entries.len,
            });
        };
        entries.truncate(covered);
        mismatched.retain(|i| *i < covered);
        let mut end = start.clone();
        for ((b, _), p) in quoted.iter().zip(&pcrs) {
            if let Some(v) = end.banks.iter_mut().find(|v| v.bank == *b) {
                v.pcr10 = p.as_slice().to_vec();
            }
        }
        end.entries_verified = start.entries_verified.saturating_add(covered as u64);
        Ok(Replayed {
            entries,
            start,
            end,
            mismatched,
        })
    }
}

/// The first of `entries` (numbered from `base + 1`) whose template data
/// does not hash to its logged template hash. Runs only for a list that
/// misses the quote, so it costs a valid list nothing.
fn first_altered(entries: &EntryList, base: u64) -> Option<Box<AlteredEntry>> {
    (0u64..)
        .zip(entries.range(0, entries.len))
        .find_map(|(i, e)| {
            if e.is_violation() {
                return None;
            }
            let alg = alg_by_len(e.template_hash().len())?;
            let computed = e.compute_template_hash(alg);
            (computed.as_slice() != e.template_hash()).then(|| {
                Box::new(AlteredEntry {
                    index: base.saturating_add(i + 1),
                    line: e.line,
                    path: e.name().into_owned(),
                    alg,
                    logged: e.template_hash().to_vec(),
                    computed: computed.as_slice().to_vec(),
                })
            })
        })
}

/// `f(i)` for each `i` in `0..n`, on up to `threads` scoped threads (the
/// caller's among them) taking indexes in order. `take` gets the results
/// in index order, on the caller's thread, as soon as each and every
/// earlier one are done (between the caller's own items): ordered work
/// such as an extend chain overlaps the rest.
fn on_threads<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> T + Sync,
    mut take: impl FnMut(T),
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let mut ready: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut given = 0usize;
    let mut give = |ready: &mut Vec<Option<T>>| {
        while let Some(t) = ready.get_mut(given).and_then(Option::take) {
            take(t);
            given += 1;
        }
    };
    let (tx, rx) = std::sync::mpsc::channel::<(usize, T)>();
    std::thread::scope(|s| {
        for _ in 1..threads.min(n) {
            let (tx, next, f) = (tx.clone(), &next, &f);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || tx.send((i, f(i))).is_err() {
                    return;
                }
            });
        }
        drop(tx);
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            let t = f(i);
            if let Some(slot) = ready.get_mut(i) {
                *slot = Some(t);
            }
            while let Ok((j, t)) = rx.try_recv() {
                if let Some(slot) = ready.get_mut(j) {
                    *slot = Some(t);
                }
            }
            give(&mut ready);
        }
        // Our share is done: the others' results as they come (the
        // channel closes when every worker has returned).
        for (j, t) in rx {
            if let Some(slot) = ready.get_mut(j) {
                *slot = Some(t);
            }
            give(&mut ready);
        }
        give(&mut ready);
    });
}

/// Entries per piece when [`judge_replayed`] spreads a list over threads.
const JUDGE_PIECE: usize = 16 * STREAM_CHUNK;
/// Entries in a list of [`PARALLEL_MIN_BYTES`] or so (~110 bytes a line).
const PARALLEL_MIN_ENTRIES: usize = PARALLEL_MIN_BYTES / 110;

/// Judge replayed entries against `policy`: the failures (template hashes
/// that do not match, then the policy's) of [`verify`] on the same entries
/// and state, without hashing again. `new_state` is the replay's end.
/// A list as long as [`PARALLEL_MIN_BYTES`] of text is judged on up to
/// [`parallel_threads`]`(max_threads)` threads, with the same result.
pub fn judge_replayed(
    replayed: &Replayed,
    policy: &RuntimePolicy,
    max_threads: usize,
) -> Result<ImaOutcome, PolicyError> {
    let threads = parallel_threads(max_threads);
    let threads = if replayed.len() < PARALLEL_MIN_ENTRIES {
        1
    } else {
        threads
    };
    judge_replayed_on(replayed, policy, threads, JUDGE_PIECE)
}

/// [`judge_replayed`] on exactly `threads` threads with pieces of `piece`
/// entries; for tests and benches.
#[doc(hidden)]
pub fn judge_replayed_on(
    replayed: &Replayed,
    policy: &RuntimePolicy,
    threads: usize,
    piece: usize,
) -> Result<ImaOutcome, PolicyError> {
    let compiled = policy.compiled()?;
    let piece = piece.max(1);
    let n = replayed.len().div_ceil(piece);
    let mut failures = Failures::default();
    on_threads(
        n,
        threads,
        |i| judge_range(replayed, compiled, i * piece, piece),
        |part| failures.absorb(part.list, part.total),
    );
    Ok(ImaOutcome {
        new_state: replayed.end.clone(),
        entries_checked: replayed.len() as u64,
        failures: failures.list,
        failures_total: failures.total,
    })
}

/// The failures of the `len` replayed entries from position `from`.
fn judge_range(
    replayed: &Replayed,
    compiled: &CompiledPolicy,
    from: usize,
    len: usize,
) -> Failures {
    let base = replayed.start.entries_verified;
    let to = from.saturating_add(len).min(replayed.len());
    let mismatched = &replayed.mismatched;
    let mut next = mismatched.partition_point(|i| *i < from);
    let mut failures = Failures::default();
    let mut first = from;
    while first < to {
        let end = first.saturating_add(STREAM_CHUNK).min(to);
        let chunk = replayed.entries.range(first, end);
        let policy = judge_policy(chunk, compiled, base + first as u64);
        let mut templates = Failures::default();
        while let Some(&i) = mismatched.get(next).filter(|i| **i < end) {
            next += 1;
            let Some(e) = replayed.entry(i) else {
                continue;
            };
            let alg = alg_by_len(e.template_hash().len()).unwrap_or(HashAlg::Sha1);
            let computed = e.compute_template_hash(alg);
            templates.absorb(
                vec![template_failure(&e, base + i as u64 + 1, alg, &computed)],
                1,
            );
        }
        merge_failures(&mut failures, templates, policy);
        first = end;
    }
    failures
}

/// Entries parsed and verified per round by [`verify_ascii`].
const STREAM_CHUNK: usize = 64;

/// Failures in index order, the first [`MAX_REPORTED_FAILURES`] kept.
#[derive(Debug, Default)]
struct Failures {
    list: Vec<ImaFailure>,
    total: u64,
}

impl Failures {
    /// Append later failures (`more` in index order, `total` of them).
    fn absorb(&mut self, mut more: Vec<ImaFailure>, total: u64) {
        self.total += total;
        more.truncate(MAX_REPORTED_FAILURES.saturating_sub(self.list.len()));
        self.list.append(&mut more);
    }
}

/// The state's banks (with `bank` added) and their PCR 10 values.
fn start_banks(state: &ImaState, bank: HashAlg) -> (ImaState, Vec<(HashAlg, DigestBytes)>) {
    let mut new_state = state.clone();
    new_state.ensure_bank(bank);
    let pcrs = new_state
        .banks
        .iter()
        .map(|b| {
            (
                b.bank,
                DigestBytes::from_slice(&b.pcr10).unwrap_or(DigestBytes::filled(0, 0)),
            )
        })
        .collect();
    (new_state, pcrs)
}

fn finish(
    mut new_state: ImaState,
    pcrs: Vec<(HashAlg, DigestBytes)>,
    entries: u64,
    failures: Failures,
) -> ImaOutcome {
    for (b, (_, pcr)) in new_state.banks.iter_mut().zip(pcrs) {
        b.pcr10 = pcr.as_slice().to_vec();
    }
    new_state.entries_verified += entries;
    ImaOutcome {
        new_state,
        entries_checked: entries,
        failures: failures.list,
        failures_total: failures.total,
    }
}

/// Extend each bank's PCR with `hashes`: per entry, one template hash per
/// bank, in the order of `pcrs`.
fn extend_all(pcrs: &mut [(HashAlg, DigestBytes)], hashes: &[DigestBytes]) {
    if pcrs.is_empty() {
        return;
    }
    for row in hashes.chunks_exact(pcrs.len()) {
        for ((alg, pcr), th) in pcrs.iter_mut().zip(row) {
            *pcr = extend(*alg, pcr, th);
        }
    }
}

/// Parse and verify an ascii list (or continuation, its first line being
/// `first_line`) in one pass: rounds of 64 entries whose buffers are reused,
/// so the list is never held parsed. Same result as [`parse_ascii_from`]
/// followed by [`verify`]; the bench measured it 1.3-1.5x faster.
/// One thread; [`verify_ascii_parallel`] spreads a large list over cores.
pub fn verify_ascii(
    input: &[u8],
    first_line: usize,
    policy: &RuntimePolicy,
    state: &ImaState,
    bank: HashAlg,
) -> Result<ImaOutcome, ImaError> {
    let compiled = policy.compiled()?;
    let (new_state, mut pcrs) = start_banks(state, bank);
    let banks: Vec<HashAlg> = pcrs.iter().map(|(b, _)| *b).collect();
    let mut failures = Failures::default();
    let done = run_lines(
        input,
        first_line,
        compiled,
        &banks,
        state.entries_verified,
        &mut failures,
        &mut |h| extend_all(&mut pcrs, h),
    )?;
    Ok(finish(new_state, pcrs, done.entries, failures))
}

/// How far [`run_lines`] got.
#[derive(Debug, Default, Clone, Copy)]
struct LinesDone {
    /// Newlines in the input (the next input's first line is this many on).
    newlines: usize,
    /// Entries (non-empty lines).
    entries: u64,
}

/// Parse the lines of `input` (numbered from `first_line`) in rounds of
/// [`STREAM_CHUNK`] entries into reused buffers, judge each round
/// (failure indexes from `index_base + 1`; entry numbers in parse errors
/// from 1) and hand its template hashes (per entry, one per bank of
/// `banks`) to `sink`. The first unparsable line ends the run.
fn run_lines(
    input: &[u8],
    first_line: usize,
    compiled: &CompiledPolicy,
    banks: &[HashAlg],
    index_base: u64,
    failures: &mut Failures,
    sink: &mut dyn FnMut(&[DigestBytes]),
) -> Result<LinesDone, ImaError> {
    let mut chunk: Vec<ImaEntry> = Vec::with_capacity(STREAM_CHUNK);
    let mut hashes: Vec<DigestBytes> = Vec::with_capacity(STREAM_CHUNK * banks.len());
    let mut filled = 0usize;
    let mut entries = 0u64;
    let mut flush = |chunk: &[ImaEntry], entries_before: u64, failures: &mut Failures| {
        hashes.clear();
        judge(
            chunk,
            compiled,
            banks,
            index_base + entries_before,
            failures,
            &mut hashes,
        );
        sink(&hashes);
    };
    let newlines = each_line(input, first_line, |raw, no, entry_no, utf8_checked| {
        match chunk.get_mut(filled) {
            Some(e) => parse_ascii_line_into(raw, no, entry_no, e, utf8_checked)?,
            None => {
                let mut e = ImaEntry::empty();
                parse_ascii_line_into(raw, no, entry_no, &mut e, utf8_checked)?;
                chunk.push(e);
            }
        }
        filled += 1;
        if filled == STREAM_CHUNK {
            flush(&chunk, entries, failures);
            entries += filled as u64;
            filled = 0;
        }
        Ok(())
    })?;
    if let Some(rest) = chunk.get(..filled).filter(|r| !r.is_empty()) {
        flush(rest, entries, failures);
        entries += filled as u64;
    }
    Ok(LinesDone { newlines, entries })
}

/// Lists shorter than this (~9,000 lines) are verified on one thread by
/// [`verify_ascii_parallel`]. Measured (proto/benches/ima.rs `threshold/*`,
/// docs/benchmarks.md): on the loaded 2-core bench machine a second thread
/// cost ~0.7 ms per call (waiting to be scheduled), 10% of a list this size.
pub const PARALLEL_MIN_BYTES: usize = 1024 * 1024;
/// Bytes of list per piece handed to a worker (about 1,200 lines).
const PIECE_BYTES: usize = 128 * 1024;

/// The threads [`verify_ascii_parallel`] uses: the cores available to the
/// process, at most `max_threads` (0: no cap).
pub fn parallel_threads(max_threads: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if max_threads == 0 {
        cores
    } else {
        cores.min(max_threads)
    }
}

/// [`verify_ascii`] on up to [`parallel_threads`]`(max_threads)` threads.
/// The list is cut at line boundaries into pieces of ~128 KiB; workers take
/// pieces in order, parse them, recompute and check every template hash,
/// judge every entry against the policy and compute each bank's template
/// hashes, and the PCR 10 extend chain runs in list order as pieces
/// complete. The result (outcome, or the error of the first bad line, with
/// the same line and entry numbers) is exactly [`verify_ascii`]'s, which
/// runs instead for a list under [`PARALLEL_MIN_BYTES`] or one thread.
pub fn verify_ascii_parallel(
    input: &[u8],
    first_line: usize,
    policy: &RuntimePolicy,
    state: &ImaState,
    bank: HashAlg,
    max_threads: usize,
) -> Result<ImaOutcome, ImaError> {
    let threads = parallel_threads(max_threads);
    if threads < 2 || input.len() < PARALLEL_MIN_BYTES {
        return verify_ascii(input, first_line, policy, state, bank);
    }
    verify_ascii_pieces(input, first_line, policy, state, bank, threads, PIECE_BYTES)
}

/// [`verify_ascii_parallel`] on exactly `threads` threads, whatever the
/// list's size or the cores; for benches that place the threshold.
#[doc(hidden)]
pub fn verify_ascii_on_threads(
    input: &[u8],
    first_line: usize,
    policy: &RuntimePolicy,
    state: &ImaState,
    bank: HashAlg,
    threads: usize,
) -> Result<ImaOutcome, ImaError> {
    verify_ascii_pieces(
        input,
        first_line,
        policy,
        state,
        bank,
        threads.max(1),
        PIECE_BYTES.min(input.len() / (4 * threads.max(1)) + 1),
    )
}

/// Cut `input` after the first newline at or past every `piece_bytes`.
fn split_lines(input: &[u8], piece_bytes: usize) -> Vec<Range<usize>> {
    let mut pieces = Vec::with_capacity(input.len() / piece_bytes.max(1) + 1);
    let mut start = 0;
    while start < input.len() {
        let target = (start + piece_bytes.max(1)).min(input.len());
        let end = match input
            .get(target - 1..)
            .and_then(|t| t.iter().position(|b| *b == b'\n'))
        {
            Some(i) => target + i,
            None => input.len(),
        };
        pieces.push(start..end);
        start = end;
    }
    pieces
}

/// One piece's result, numbered as if it started the list at line 0 and
/// entry 0 (the merge shifts it).
#[derive(Debug, Default)]
struct Piece {
    done: LinesDone,
    failures: Failures,
    hashes: Vec<DigestBytes>,
    error: Option<ImaError>,
}

/// A parse error of a piece, renumbered to the whole list.
fn shift_error(e: ImaError, lines: usize, entries: usize) -> ImaError {
    match e {
        ImaError::LineTooLong { line, len, max } => ImaError::LineTooLong {
            line: line + lines,
            len,
            max,
        },
        ImaError::Malformed {
            line,
            field,
            detail,
        } => ImaError::Malformed {
            line: line + lines,
            field,
            detail,
        },
        ImaError::NotUtf8 { line } => ImaError::NotUtf8 { line: line + lines },
        ImaError::UnsupportedTemplate { entry, line, name } => ImaError::UnsupportedTemplate {
            entry: entry + entries,
            line: line + lines,
            name,
        },
        ImaError::UnsupportedAlgorithm { entry, line, name } => ImaError::UnsupportedAlgorithm {
            entry: entry + entries,
            line: line + lines,
            name,
        },
        other => other,
    }
}

fn verify_ascii_pieces(
    input: &[u8],
    first_line: usize,
    policy: &RuntimePolicy,
    state: &ImaState,
    bank: HashAlg,
    threads: usize,
    piece_bytes: usize,
) -> Result<ImaOutcome, ImaError> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let compiled = policy.compiled()?;
    let (new_state, mut pcrs) = start_banks(state, bank);
    let banks: Vec<HashAlg> = pcrs.iter().map(|(b, _)| *b).collect();
    let ranges = split_lines(input, piece_bytes);
    // The first piece known to hold a bad line; later ones need no work.
    let first_error = AtomicUsize::new(usize::MAX);
    let mut failures = Failures::default();
    let mut line = first_line;
    let mut entries = 0u64;
    let mut error = None;
    on_threads(
        ranges.len(),
        threads,
        |i| {
            if i > first_error.load(Ordering::Relaxed) {
                return None;
            }
            let text = ranges
                .get(i)
                .and_then(|r| input.get(r.clone()))
                .unwrap_or_default();
            let mut p = Piece {
                hashes: Vec::with_capacity(text.len() / 64 * banks.len()),
                ..Piece::default()
            };
            let hashes = &mut p.hashes;
            match run_lines(text, 0, compiled, &banks, 0, &mut p.failures, &mut |h| {
                hashes.extend_from_slice(h)
            }) {
                Ok(done) => p.done = done,
                Err(e) => {
                    p.error = Some(e);
                    first_error.fetch_min(i, Ordering::Relaxed);
                }
            }
            Some(p)
        },
        // In list order: the extend chain, and failures and errors
        // renumbered to the whole list. A skipped piece comes after an
        // error, which ends the run.
        |p| {
            let Some(p) = p.filter(|_| error.is_none()) else {
                return;
            };
            if let Some(e) = p.error {
                error = Some(shift_error(e, line, entries as usize));
                return;
            }
            extend_all(&mut pcrs, &p.hashes);
            let mut list = p.failures.list;
            for f in &mut list {
                f.line += line;
                f.index += state.entries_verified + entries;
            }
            failures.absorb(list, p.failures.total);
            line += p.done.newlines;
            entries += p.done.entries;
        },
    );
    if let Some(e) = error {
        return Err(e);
    }
    Ok(finish(new_state, pcrs, entries, failures))
}

fn verify_compiled(
    entries: &[ImaEntry],
    compiled: &CompiledPolicy,
    state: &ImaState,
    bank: HashAlg,
) -> ImaOutcome {
    let (new_state, mut pcrs) = start_banks(state, bank);
    let banks: Vec<HashAlg> = pcrs.iter().map(|(b, _)| *b).collect();
    let mut failures = Failures::default();
    let mut hashes = Vec::with_capacity(STREAM_CHUNK * banks.len());
    let mut base = state.entries_verified;
    for chunk in entries.chunks(STREAM_CHUNK) {
        hashes.clear();
        judge(chunk, compiled, &banks, base, &mut failures, &mut hashes);
        extend_all(&mut pcrs, &hashes);
        base += chunk.len() as u64;
    }
    finish(new_state, pcrs, entries.len() as u64, failures)
}

/// Judge `entries` against the policy and check each logged template hash
/// against its data; failures are indexed from `index_base + 1`. Pushes,
/// per entry, its template hash for each of `banks` (what the PCR is
/// extended with) to `hashes`.
fn judge(
    entries: &[ImaEntry],
    compiled: &CompiledPolicy,
    banks: &[HashAlg],
    index_base: u64,
    failures: &mut Failures,
    hashes: &mut Vec<DigestBytes>,
) {
    // Policy first, then hashing: see `judge_policy`.
    let views = entries.iter().map(ImaEntry::view);
    let policy = judge_policy(views.clone(), compiled, index_base);
    let mut templates = Failures::default();
    hash_entries(
        views,
        banks,
        LoggedCheck::All,
        hashes,
        |i, e, alg, computed| {
            templates.absorb(
                vec![template_failure(
                    e,
                    index_base + i as u64 + 1,
                    alg,
                    computed,
                )],
                1,
            );
        },
    );
    merge_failures(failures, templates, policy);
}

/// The policy's verdict on each of `entries` (failures indexed from
/// `index_base + 1`). The policy records of each group of [`WARM_GROUP`]
/// entries are touched first: those loads do not depend on each other, so
/// their cache misses overlap (the policy table is far larger than the
/// cache); the path hashes computed for that are reused by the lookups.
fn judge_policy<'a>(
    entries: impl Iterator<Item = EntryRef<'a>> + Clone,
    compiled: &CompiledPolicy,
    index_base: u64,
) -> Failures {
    let mut out = Failures::default();
    let mut rest = entries;
    let mut i = 0u64;
    while rest.clone().next().is_some() {
        // A group: warmed (and its path hashes computed) from a copy of
        // the iterator, then judged from the iterator itself.
        let hashes = compiled.warm(rest.clone());
        for (e, hash) in rest.by_ref().take(WARM_GROUP).zip(hashes) {
            i += 1;
            let verdict = if e.pcr != 10 {
                Err((FailureCode::UnexpectedPcr, Vec::new()))
            } else if e.is_violation() {
                if compiled.allow_violations {
                    Ok(())
                } else {
                    Err((FailureCode::Violation, Vec::new()))
                }
            } else {
                compiled.evaluate(&e, hash)
            };
            if let Err((code, expected)) = verdict {
                out.total += 1;
                if out.list.len() < MAX_REPORTED_FAILURES {
                    out.list.push(failure(&e, index_base + i, code, expected));
                }
            }
        }
    }
    out
}

/// Which logged template hashes [`hash_entries`] recomputes and checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LoggedCheck {
    /// Every one: nothing else vouches for the list (`verify`,
    /// `verify_ascii`, whose callers may hold no quote).
    All,
    /// Those of an algorithm among the banks replayed, which are computed
    /// anyway (the server's log step). A replay that reaches the quote
    /// authenticates every entry's data through the quoted bank, so a
    /// logged hash of an unquoted bank (the kernel's SHA-1 column, with
    /// only SHA-256 quoted) adds nothing to it; a replay that misses the
    /// quote checks them all to name the altered entry ([`first_altered`]).
    /// Keylime recomputes the SHA-1 column on every entry: ~12% of our
    /// time per entry (docs/benchmarks.md).
    InBanks,
}

/// Per entry of `entries`, in order: recompute its logged template hash
/// as `check` says (calling `mismatch(position, entry, alg, computed)`
/// when the data does not hash to it) and push its template hash for each
/// of `banks`.
fn hash_entries<'a>(
    entries: impl IntoIterator<Item = EntryRef<'a>>,
    banks: &[HashAlg],
    check: LoggedCheck,
    hashes: &mut Vec<DigestBytes>,
    mut mismatch: impl FnMut(usize, &EntryRef<'a>, HashAlg, &DigestBytes),
) {
    for (i, e) in entries.into_iter().enumerate() {
        let logged_alg = alg_by_len(e.template_hash().len()).unwrap_or(HashAlg::Sha1);
        let violation = e.is_violation();
        // The template data padded once for the logged hash and the banks'.
        let padded = match e.template {
            Template::Ima => None,
            _ if violation => None,
            _ => Padded::new(&[e.template_data()]),
        };
        let hash_with = |alg: HashAlg| {
            padded
                .as_ref()
                .and_then(|p| p.hash(alg))
                .unwrap_or_else(|| e.compute_template_hash(alg))
        };
        let mut logged_ok = None;
        if !violation && (check == LoggedCheck::All || banks.contains(&logged_alg)) {
            let computed = hash_with(logged_alg);
            if computed.as_slice() != e.template_hash() {
                mismatch(i, &e, logged_alg, &computed);
            }
            logged_ok = Some(computed);
        }
        for alg in banks {
            hashes.push(match logged_ok {
                Some(c) if *alg == logged_alg => c,
                _ if violation => e.template_hash_for(*alg),
                _ => hash_with(*alg),
            });
        }
    }
}

/// The failure of an entry whose data hashes (with `alg`) to `computed`,
/// not to its logged template hash.
fn template_failure(
    e: &EntryRef<'_>,
    index: u64,
    alg: HashAlg,
    computed: &DigestBytes,
) -> ImaFailure {
    ImaFailure {
        index,
        line: e.line,
        path: e.name().into_owned(),
        code: FailureCode::TemplateHashMismatch,
        expected: vec![format!("{alg}:{}", hex::encode(e.template_hash()))],
        actual: Some(format!("{alg}:{}", hex::encode(computed.as_slice()))),
    }
}

/// Add one round's template and policy failures to `failures`, in index
/// order. The first failures overall are among the first of each kind; for
/// one entry, the template hash failure comes first (stable sort).
fn merge_failures(failures: &mut Failures, templates: Failures, policy: Failures) {
    let mut list = templates.list;
    let mut rest = policy.list;
    list.append(&mut rest);
    list.sort_by_key(|f| f.index);
    failures.absorb(list, templates.total + policy.total);
}

fn failure(e: &EntryRef<'_>, index: u64, code: FailureCode, expected: Vec<String>) -> ImaFailure {
    ImaFailure {
        index,
        line: e.line,
        path: e.name().into_owned(),
        code,
        expected: expected.into_iter().take(MAX_EXPECTED_SHOWN).collect(),
        actual: Some(format!("{}:{}", e.digest_alg, hex::encode(e.digest()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime_policy::PolicyDocument;

    const RK_LIST: &[u8] =
        include_bytes!("../../fixtures/ima/rust-keylime-ascii_runtime_measurements");
    const KL_LOGS: [(&str, &[u8], &[u8]); 4] = [
        (
            "sha1",
            include_bytes!("../../fixtures/ima/keylime-ima-log-sha1"),
            include_bytes!("../../fixtures/ima/keylime-policy-sha1"),
        ),
        (
            "sha256",
            include_bytes!("../../fixtures/ima/keylime-ima-log-sha256"),
            include_bytes!("../../fixtures/ima/keylime-policy-sha256"),
        ),
        (
            "sha384",
            include_bytes!("../../fixtures/ima/keylime-ima-log-sha384"),
            include_bytes!("../../fixtures/ima/keylime-policy-sha384"),
        ),
        (
            "sha512",
            include_bytes!("../../fixtures/ima/keylime-ima-log-sha512"),
            include_bytes!("../../fixtures/ima/keylime-policy-sha512"),
        ),
    ];

    /// A policy allowing exactly what `entries` carry.
    fn policy_of(entries: &[ImaEntry]) -> RuntimePolicy {
        let mut doc = PolicyDocument::default();
        for e in entries {
            doc.digests
                .entry(e.name().into_owned())
                .or_default()
                .push(format!("{}:{}", e.digest_alg, hex::encode(e.digest())));
        }
        doc.allow_violations = true;
        RuntimePolicy::new(doc)
    }

    #[test]
    fn rust_keylime_list_template_hashes_and_sha1_replay() {
        let entries = parse_ascii(RK_LIST).unwrap();
        assert_eq!(entries.len(), 826);
        assert_eq!(entries[1].name(), "/init");
        assert_eq!(entries[1].line, 2);
        assert_eq!(entries[1].digest_alg, HashAlg::Sha1);
        // The logged column is the kernel's SHA-1 of the template data.
        for e in &entries {
            assert_eq!(
                e.compute_template_hash(HashAlg::Sha1),
                e.template_hash,
                "line {}",
                e.line
            );
        }
        // PCR 10 folded from the logged column alone.
        let mut aggregate = vec![0u8; 20];
        for e in &entries {
            let th: Vec<u8> = if e.is_violation() {
                vec![0xff; 20]
            } else {
                e.template_hash.as_slice().to_vec()
            };
            aggregate = HashAlg::Sha1.hash(&[&aggregate, &th]);
        }
        assert_eq!(replay(&entries, HashAlg::Sha1), aggregate);
        let out = verify(
            &entries,
            &policy_of(&entries),
            &ImaState::new(None, None, &[]),
            HashAlg::Sha1,
        )
        .unwrap();
        assert!(out.ok(), "{:?}", out.failures);
        assert_eq!(out.entries_checked, 826);
        out.new_state
            .matches_quote(HashAlg::Sha1, &aggregate)
            .unwrap();
        // Other banks replay from the same data with their own hash.
        assert_eq!(
            verify(
                &entries,
                &policy_of(&entries),
                &ImaState::new(None, None, &[]),
                HashAlg::Sha256
            )
            .unwrap()
            .new_state
            .pcr10(HashAlg::Sha256)
            .unwrap(),
            replay(&entries, HashAlg::Sha256).as_slice()
        );
    }

    #[test]
    fn keylime_logs_parse_and_verify() {
        for (alg, log, policy) in KL_LOGS {
            let entries = parse_ascii(log).unwrap();
            assert_eq!(entries.len(), 2, "{alg}");
            let data = &entries[1];
            assert_eq!(data.name(), "/data");
            assert_eq!(data.digest_alg.name(), alg);
            assert_eq!(
                data.compute_template_hash(HashAlg::Sha1),
                data.template_hash
            );
            if !entries[0].is_violation() {
                assert_eq!(
                    entries[0].compute_template_hash(HashAlg::Sha1),
                    entries[0].template_hash
                );
            }
            // Keylime's generated policy names /base_policy_data, not /data.
            let p = RuntimePolicy::from_keylime_json(policy).unwrap();
            p.validate().unwrap();
            assert!(p.document().digests.contains_key("/base_policy_data"));
            let out = verify(
                &entries,
                &p,
                &ImaState::new(None, None, &[]),
                HashAlg::Sha256,
            )
            .unwrap();
            let f = out.failures.iter().find(|f| f.path == "/data").unwrap();
            assert_eq!(f.code, FailureCode::NotInPolicy);
            assert_eq!(f.line, 2);
            assert_eq!(
                f.actual.as_deref(),
                Some(format!("{alg}:{}", hex::encode(data.digest())).as_str())
            );
            // The list against a policy of its own digests passes.
            let own = verify(
                &entries,
                &policy_of(&entries),
                &ImaState::new(None, None, &[]),
                HashAlg::Sha256,
            )
            .unwrap();
            assert!(own.ok(), "{alg}: {:?}", own.failures);
        }
    }

    #[test]
    fn binary_round_trip() {
        let entries = parse_ascii(RK_LIST).unwrap();
        let bin = encode_binary(&entries);
        let back = parse_binary(&bin).unwrap();
        assert_eq!(back.len(), entries.len());
        for (a, b) in entries.iter().zip(&back) {
            assert_eq!(a.template_data(), b.template_data());
            assert_eq!(a.name(), b.name());
            assert_eq!(a.digest(), b.digest());
            assert_eq!(a.template_hash, b.template_hash);
            assert_eq!(b.compute_template_hash(HashAlg::Sha1), b.template_hash);
        }
        assert_eq!(
            replay(&back, HashAlg::Sha1),
            replay(&entries, HashAlg::Sha1)
        );
        // And back to ascii, byte for byte.
        assert_eq!(encode_ascii(&back).as_bytes(), RK_LIST);
    }

    #[test]
    fn every_template_round_trips() {
        let sig = [3u8, 2, 4, 1, 2, 3, 4, 0, 2, 0xaa, 0xbb];
        let list = vec![
            make_entry(Template::Ima, HashAlg::Sha1, &[7; 20], "/usr/bin/old", &[]).unwrap(),
            make_entry(
                Template::ImaNg,
                HashAlg::Sha512,
                &[8; 64],
                "/with space",
                &[],
            )
            .unwrap(),
            make_entry(
                Template::ImaSig,
                HashAlg::Sha256,
                &[9; 32],
                "/signed file",
                &sig,
            )
            .unwrap(),
            make_entry(
                Template::ImaSig,
                HashAlg::Sha256,
                &[9; 32],
                "/unsigned",
                &[],
            )
            .unwrap(),
            make_entry(
                Template::ImaBuf,
                HashAlg::Sha256,
                &[10; 32],
                ".ima",
                b"key bytes",
            )
            .unwrap(),
        ];
        let ascii = encode_ascii(&list);
        let from_ascii = parse_ascii(ascii.as_bytes()).unwrap();
        let from_bin = parse_binary(&encode_binary(&list)).unwrap();
        for parsed in [&from_ascii, &from_bin] {
            assert_eq!(parsed.len(), list.len());
            for (a, b) in list.iter().zip(parsed.iter()) {
                assert_eq!(a.template, b.template);
                assert_eq!(a.name(), b.name());
                assert_eq!(a.digest(), b.digest());
                assert_eq!(a.extra(), b.extra());
                assert_eq!(a.template_data(), b.template_data());
                assert_eq!(b.compute_template_hash(HashAlg::Sha1), b.template_hash);
            }
        }
        assert_eq!(from_ascii[2].extra(), &sig);
        // `ima`: digest || name padded to 256 bytes.
        let mut input = vec![7u8; 20];
        input.extend_from_slice(b"/usr/bin/old");
        input.resize(20 + 256, 0);
        assert_eq!(
            list[0].template_hash.as_slice(),
            HashAlg::Sha1.hash(&[&input]).as_slice()
        );
        // ima-ng data: "sha512:\0" digest, name with NUL.
        assert_eq!(&list[1].template_data()[4..12], b"sha512:\0");
        assert_eq!(list[1].template_data().last(), Some(&0));
    }

    #[test]
    fn altered_digest_reported_with_line_and_path() {
        let text = std::str::from_utf8(RK_LIST).unwrap();
        let good = parse_ascii(RK_LIST).unwrap();
        let policy = policy_of(&good);
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let target = 100; // 0-based: line 101
        let path = good[target].name().into_owned();
        // Flip the first digest hex digit of that line.
        let l = &mut lines[target];
        let pos = l.find("sha1:").unwrap() + 5;
        let c = if &l[pos..pos + 1] == "0" { "1" } else { "0" };
        l.replace_range(pos..pos + 1, c);
        let altered = lines.join("\n");
        let entries = parse_ascii(altered.as_bytes()).unwrap();
        let out = verify(
            &entries,
            &policy,
            &ImaState::new(None, None, &[]),
            HashAlg::Sha1,
        )
        .unwrap();
        assert!(!out.ok());
        let first = &out.failures[0];
        assert_eq!(first.line, 101);
        assert_eq!(first.index, 101);
        assert_eq!(first.path, path);
        assert_eq!(first.code, FailureCode::TemplateHashMismatch);
        let dm = out
            .failures
            .iter()
            .find(|f| f.code == FailureCode::DigestMismatch)
            .unwrap();
        assert_eq!(dm.line, 101);
        assert_eq!(
            dm.expected,
            vec![format!("sha1:{}", hex::encode(good[target].digest()))]
        );
        assert_ne!(dm.actual.as_deref(), Some(dm.expected[0].as_str()));
        // The replay differs from the good list's, so the quote would not match.
        assert!(out
            .new_state
            .matches_quote(HashAlg::Sha1, &replay(&good, HashAlg::Sha1))
            .is_err());
    }

    #[test]
    fn invalid_inputs_are_refused_with_positions() {
        let invalid = include_bytes!("../../fixtures/ima/rust-keylime-invalid_ima_log.txt");
        let e = parse_ascii(invalid).unwrap_err();
        assert_eq!(e.code(), "ima_malformed_line");
        assert!(matches!(e, ImaError::Malformed { line: 1, .. }), "{e}");
        let empty = include_bytes!("../../fixtures/ima/rust-keylime-empty_ima_log.txt");
        assert!(parse_ascii(empty).unwrap().is_empty());
        let one = parse_ascii(include_bytes!(
            "../../fixtures/ima/rust-keylime-ima_log.txt"
        ))
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].name(), "boot_aggregate");
        assert_eq!(
            one[0].compute_template_hash(HashAlg::Sha1),
            one[0].template_hash
        );

        let mut text = String::from_utf8(RK_LIST.to_vec()).unwrap();
        text.push_str(&"x".repeat(MAX_ASCII_LINE + 1));
        let e = parse_ascii(text.as_bytes()).unwrap_err();
        assert!(matches!(e, ImaError::LineTooLong { line: 827, .. }), "{e}");

        for (bad, field) in [
            ("10 abc ima-ng sha1:00 /x", "template hash"),
            (
                "x 0000000000000000000000000000000000000000 ima-ng sha1:00 /x",
                "pcr",
            ),
            (
                "10 1111111111111111111111111111111111111111 ima-ng sha1:00 /x",
                "digest",
            ),
            (
                "10 1111111111111111111111111111111111111111 ima-ng sha1",
                "digest",
            ),
            (
                "10 1111111111111111111111111111111111111111 ima-ng",
                "digest",
            ),
            // Of the right length, with a non-digit (checked as decoded).
            (
                "10 111111111111111111111111111111111111111g ima-ng sha1:0000000000000000000000000000000000000000 /x",
                "template hash",
            ),
            (
                "10 1111111111111111111111111111111111111111 ima-ng sha1:000000000000000000000000000000000000000: /x",
                "digest",
            ),
            (
                "10 1111111111111111111111111111111111111111 ima 000000000000000000000000000000000000000z /x",
                "digest",
            ),
        ] {
            let input = format!("{}\n\n{bad}\n", std::str::from_utf8(one_line()).unwrap());
            match parse_ascii(input.as_bytes()) {
                Err(ImaError::Malformed {
                    line: 3, field: f, ..
                }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
            // The server's compact parse says the same.
            let start = ImaState::new(None, None, &[HashAlg::Sha256]);
            let q = [(HashAlg::Sha256, &[0u8; 32][..])];
            let compact = replay_ascii_to_quote(input.as_bytes(), 1, &start, &q, 1);
            assert_eq!(
                compact.unwrap_err(),
                ReplayFailure::Parse(parse_ascii(input.as_bytes()).unwrap_err()),
                "{bad}"
            );
        }
        let e =
            parse_ascii(b"10 1111111111111111111111111111111111111111 evm-sig x y\n").unwrap_err();
        assert_eq!(e.code(), "ima_unsupported_template");
        let e = parse_ascii(b"10 1111111111111111111111111111111111111111 ima-ng md5:00 y\n")
            .unwrap_err();
        assert_eq!(e.code(), "ima_unsupported_algorithm");

        // Every truncation of a binary list is an error, never a panic.
        let three = &parse_ascii(RK_LIST).unwrap()[..3];
        let bin = encode_binary(three);
        let boundaries: Vec<usize> = (1..3).map(|n| encode_binary(&three[..n]).len()).collect();
        for cut in (1..bin.len()).filter(|c| !boundaries.contains(c)) {
            let r = parse_binary(&bin[..cut]);
            let e = r.expect_err("truncated list accepted");
            assert!(
                matches!(e.code(), "ima_truncated" | "ima_malformed_entry"),
                "{cut}: {e}"
            );
        }
        // A length field larger than the input is refused without allocating it.
        let mut huge = bin.clone();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_binary(&huge).is_err());
    }

    fn one_line() -> &'static [u8] {
        include_bytes!("../../fixtures/ima/rust-keylime-ima_log.txt").trim_ascii_end()
    }

    #[test]
    fn excludes_skip_paths() {
        let entries = parse_ascii(RK_LIST).unwrap();
        let keep: Vec<ImaEntry> = entries
            .iter()
            .filter(|e| !e.name().starts_with("/lib/"))
            .cloned()
            .collect();
        let mut doc = policy_of(&keep).document().clone();
        let without = verify(
            &entries,
            &RuntimePolicy::new(doc.clone()),
            &ImaState::new(None, None, &[]),
            HashAlg::Sha1,
        )
        .unwrap();
        let lib_count = entries.len() - keep.len();
        assert!(lib_count > 0);
        assert_eq!(without.failures_total as usize, lib_count);
        assert!(without
            .failures
            .iter()
            .all(|f| f.path.starts_with("/lib/") && f.code == FailureCode::NotInPolicy));
        doc.excludes = vec!["/lib/.*".into()];
        let with = verify(
            &entries,
            &RuntimePolicy::new(doc.clone()),
            &ImaState::new(None, None, &[]),
            HashAlg::Sha1,
        )
        .unwrap();
        assert!(with.ok(), "{:?}", with.failures);
        // Anchored at the start: "lib/" alone does not match "/lib/...".
        doc.excludes = vec!["lib/".into()];
        let anchored = verify(
            &entries,
            &RuntimePolicy::new(doc),
            &ImaState::new(None, None, &[]),
            HashAlg::Sha1,
        )
        .unwrap();
        assert_eq!(anchored.failures_total as usize, lib_count);
    }

    #[test]
    fn incremental_equals_at_once() {
        let entries = parse_ascii(RK_LIST).unwrap();
        let policy = policy_of(&entries[..600]);
        let banks = [HashAlg::Sha1, HashAlg::Sha256];
        let start = ImaState::for_boot(None, Some("boot-1"), Some(3), &banks);
        let whole = verify(&entries, &policy, &start, HashAlg::Sha256).unwrap();
        let first = verify(&entries[..400], &policy, &start, HashAlg::Sha256).unwrap();
        let rest = first.new_state.continuation(&entries).unwrap();
        assert_eq!(rest.len(), 426);
        let second = verify(rest, &policy, &first.new_state, HashAlg::Sha256).unwrap();
        assert_eq!(second.new_state, whole.new_state);
        assert_eq!(second.new_state.entries_verified, 826);
        assert_eq!(
            first.failures_total + second.failures_total,
            whole.failures_total
        );
        assert_eq!(
            second.failures.first().map(|f| f.index),
            whole.failures.first().map(|f| f.index)
        );
        for b in banks {
            assert_eq!(
                whole.new_state.pcr10(b).unwrap(),
                replay(&entries, b).as_slice()
            );
        }
        // Same boot continues; a reboot (new reset count) starts over.
        let same = ImaState::for_boot(Some(&whole.new_state), Some("boot-1"), Some(3), &banks);
        assert_eq!(same.entries_verified, 826);
        let rebooted = ImaState::for_boot(Some(&whole.new_state), Some("boot-1"), Some(4), &banks);
        assert_eq!(rebooted.entries_verified, 0);
        assert_eq!(rebooted.pcr10(HashAlg::Sha1).unwrap(), &[0u8; 20]);
        // A list shorter than what was verified cannot be continued.
        assert!(whole.new_state.continuation(&entries[..10]).is_err());
        // The state survives JSON (the server stores it per host).
        let json = serde_json::to_string(&whole.new_state).unwrap();
        assert_eq!(
            serde_json::from_str::<ImaState>(&json).unwrap(),
            whole.new_state
        );
    }

    #[test]
    fn streaming_equals_parse_then_verify() {
        let good = parse_ascii(RK_LIST).unwrap();
        // A policy missing some paths, so failures cross chunk boundaries.
        let policy = policy_of(&good[..500]);
        let start = ImaState::new(Some("b".into()), Some(1), &[HashAlg::Sha1]);
        let at_once = verify(&good, &policy, &start, HashAlg::Sha256).unwrap();
        let streamed = verify_ascii(RK_LIST, 1, &policy, &start, HashAlg::Sha256).unwrap();
        assert_eq!(streamed, at_once);
        assert!(streamed.failures_total > MAX_REPORTED_FAILURES as u64);
        // A continuation: the second half of the lines, numbered from 401.
        let text = std::str::from_utf8(RK_LIST).unwrap();
        let tail: String = text.lines().skip(400).map(|l| format!("{l}\n")).collect();
        let first = verify(&good[..400], &policy, &start, HashAlg::Sha256).unwrap();
        let second = verify_ascii(
            tail.as_bytes(),
            401,
            &policy,
            &first.new_state,
            HashAlg::Sha256,
        )
        .unwrap();
        assert_eq!(second.new_state, at_once.new_state);
        assert_eq!(second.failures.first().map(|f| f.line), Some(501));
        // Bad input is still refused with its line.
        let e = verify_ascii(b"10 x ima-ng\n", 1, &policy, &start, HashAlg::Sha1).unwrap_err();
        assert_eq!(e.code(), "ima_malformed_line");
    }

    #[test]
    fn violations_extend_all_ones() {
        let mut v = make_entry(
            Template::ImaNg,
            HashAlg::Sha256,
            &[0; 32],
            "/var/log/x",
            &[],
        )
        .unwrap();
        v.template_hash = DigestBytes::filled(20, 0);
        let ok = make_entry(Template::ImaNg, HashAlg::Sha256, &[1; 32], "/bin/a", &[]).unwrap();
        let list = vec![ok.clone(), v.clone()];
        for bank in [
            HashAlg::Sha1,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
        ] {
            let n = bank.digest_len();
            let p1 = bank.hash(&[&vec![0; n], ok.template_hash_for(bank).as_slice()]);
            let p2 = bank.hash(&[&p1, &vec![0xff; n]]);
            assert_eq!(replay(&list, bank), p2, "{bank}");
        }
        let mut doc = policy_of(&[ok]).document().clone();
        doc.allow_violations = false;
        let out = verify(
            &list,
            &RuntimePolicy::new(doc.clone()),
            &ImaState::new(None, None, &[]),
            HashAlg::Sha1,
        )
        .unwrap();
        assert_eq!(out.failures_total, 1);
        assert_eq!(out.failures[0].code, FailureCode::Violation);
        assert_eq!(out.failures[0].index, 2);
        doc.allow_violations = true;
        let out = verify(
            &list,
            &RuntimePolicy::new(doc),
            &ImaState::new(None, None, &[]),
            HashAlg::Sha1,
        )
        .unwrap();
        assert!(out.ok());
    }

    #[test]
    fn signatures_rsa_and_p256() {
        use crate::runtime_policy::{kernel_hash_algo_id, key_id};
        use base64::Engine;
        use p256::ecdsa::signature::hazmat::PrehashSigner;
        use p256::pkcs8::EncodePublicKey;
        use rsa::pkcs8::DecodePrivateKey;

        let rsa_key = rsa::RsaPrivateKey::from_pkcs8_pem(include_str!(
            "../../fixtures/credential/test-ek.key"
        ))
        .unwrap();
        let rsa_pem = rsa_key
            .to_public_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let ec_key = p256::ecdsa::SigningKey::from_bytes(&[0x42u8; 32].into()).unwrap();
        // base64 DER (the form Keylime keeps keys in) is accepted as well as PEM.
        let ec_pem = base64::engine::general_purpose::STANDARD.encode(
            p256::PublicKey::from(ec_key.verifying_key())
                .to_public_key_der()
                .unwrap()
                .as_bytes(),
        );

        let digest = HashAlg::Sha256.hash(&[b"file contents"]);
        let header = |kid: u32, sig: &[u8]| {
            let mut v = vec![3u8, 2, kernel_hash_algo_id(HashAlg::Sha256)];
            v.extend_from_slice(&kid.to_be_bytes());
            v.extend_from_slice(&(sig.len() as u16).to_be_bytes());
            v.extend_from_slice(sig);
            v
        };
        let rsa_sig = rsa_key
            .sign(
                rsa::Pkcs1v15Sign {
                    hash_len: Some(32),
                    prefix: crate::runtime_policy::tests_prefix_sha256().into(),
                },
                &digest,
            )
            .unwrap();
        let ec_sig: p256::ecdsa::Signature = ec_key.sign_prehash(&digest).unwrap();
        let rsa_xattr = header(key_id(&rsa_pem).unwrap(), &rsa_sig);
        let ec_xattr = header(key_id(&ec_pem).unwrap(), ec_sig.to_der().as_bytes());
        let mut bad_xattr = rsa_xattr.clone();
        let last = bad_xattr.len() - 1;
        bad_xattr[last] ^= 1;
        let list = vec![
            make_entry(
                Template::ImaSig,
                HashAlg::Sha256,
                &digest,
                "/usr/bin/rsa-signed",
                &rsa_xattr,
            )
            .unwrap(),
            make_entry(
                Template::ImaSig,
                HashAlg::Sha256,
                &digest,
                "/usr/bin/ec-signed",
                &ec_xattr,
            )
            .unwrap(),
            make_entry(
                Template::ImaSig,
                HashAlg::Sha256,
                &digest,
                "/usr/bin/bad-sig",
                &bad_xattr,
            )
            .unwrap(),
            make_entry(
                Template::ImaSig,
                HashAlg::Sha256,
                &digest,
                "/usr/bin/no-sig",
                &[],
            )
            .unwrap(),
        ];
        let list = parse_ascii(encode_ascii(&list).as_bytes()).unwrap();
        let doc = PolicyDocument {
            keys: vec![rsa_pem, ec_pem],
            ..Default::default()
        };
        let out = verify(
            &list,
            &RuntimePolicy::new(doc),
            &ImaState::new(None, None, &[]),
            HashAlg::Sha256,
        )
        .unwrap();
        let codes: Vec<_> = out.failures.iter().map(|f| (f.line, f.code)).collect();
        assert_eq!(
            codes,
            vec![
                (3, FailureCode::SignatureInvalid),
                (4, FailureCode::NotInPolicy)
            ]
        );
    }

    /// `verify_ascii_pieces` with many piece sizes (1 byte: every line its
    /// own piece, so every line sits on a boundary) and thread counts must
    /// give exactly `verify_ascii`'s result; returns that result.
    fn parallel_agrees(
        input: &[u8],
        first_line: usize,
        policy: &RuntimePolicy,
        state: &ImaState,
        bank: HashAlg,
    ) -> Result<ImaOutcome, ImaError> {
        let seq = verify_ascii(input, first_line, policy, state, bank);
        match &seq {
            Ok(seq) => replay_agrees(input, first_line, policy, state, seq),
            Err(e) => {
                // The server's log step refuses the same line the same way.
                let quoted = [(bank, [0u8; 32].as_slice())];
                for piece in [1, 97, 1000, 1 << 20] {
                    assert_eq!(
                        replay_ascii_pieces(input, first_line, state, &quoted, 2, piece),
                        Err(ReplayFailure::Parse(e.clone())),
                        "piece {piece} bytes"
                    );
                }
            }
        }
        for piece in [1, 97, 150, 1000, 7000, 1 << 20] {
            for threads in [2, 3, 4] {
                let par =
                    verify_ascii_pieces(input, first_line, policy, state, bank, threads, piece);
                assert_eq!(par, seq, "piece {piece} bytes, {threads} threads");
            }
        }
        seq
    }

    /// The server's two steps, [`replay_to_quote`] then [`judge_replayed`],
    /// must give `expected` ([`verify`]'s outcome) for a quote of where the
    /// list ends, also when the list read after the quote runs past it.
    fn replay_agrees(
        input: &[u8],
        first_line: usize,
        policy: &RuntimePolicy,
        state: &ImaState,
        expected: &ImaOutcome,
    ) {
        let entries = parse_ascii_from(input, first_line).unwrap();
        let quoted: Vec<(HashAlg, Vec<u8>)> = expected
            .new_state
            .banks
            .iter()
            .map(|b| (b.bank, b.pcr10.clone()))
            .collect();
        let q: Vec<(HashAlg, &[u8])> = quoted.iter().map(|(b, v)| (*b, v.as_slice())).collect();
        let mut longer = entries.clone();
        longer.extend(parse_ascii(one_line()).unwrap());
        let r = replay_to_quote(longer, state, &q).unwrap();
        assert_eq!(r.end, expected.new_state);
        assert_eq!(&judge_replayed(&r, policy, 1).unwrap(), expected);
        let r = replay_to_quote(entries, state, &q).unwrap();
        assert_eq!(&judge_replayed(&r, policy, 0).unwrap(), expected);
        // Spread over threads, in pieces as small as one line or entry.
        for piece in [1, 150, 7000, 1 << 20] {
            for threads in [2, 3] {
                let par = replay_ascii_pieces(input, first_line, state, &q, threads, piece);
                assert_eq!(
                    par.as_ref(),
                    Ok(&r),
                    "piece {piece} bytes, {threads} threads"
                );
            }
        }
        // Judged in pieces of entries, of a list kept as one block and of
        // one kept as a block per line (judging pieces straddle blocks).
        let lines = replay_ascii_pieces(input, first_line, state, &q, 2, 1).unwrap();
        for piece in [1, 63, 64, 1000] {
            for threads in [1, 2, 3] {
                for r in [&r, &lines] {
                    let out = judge_replayed_on(r, policy, threads, piece).unwrap();
                    assert_eq!(&out, expected, "piece {piece} entries, {threads} threads");
                }
            }
        }
        // Bank order is the quote's; the outcome is not.
        let reversed: Vec<(HashAlg, &[u8])> = q.iter().rev().copied().collect();
        let entries = parse_ascii_from(input, first_line).unwrap();
        let r = replay_to_quote(entries, state, &reversed).unwrap();
        assert_eq!(
            judge_replayed(&r, policy, 1).unwrap().failures,
            expected.failures
        );
    }

    /// RK_LIST with line `no` (1-based) passed through `f`.
    fn edit_line(no: usize, f: impl Fn(&str) -> String) -> Vec<u8> {
        let text = std::str::from_utf8(RK_LIST).unwrap();
        let mut out = String::new();
        for (i, l) in text.lines().enumerate() {
            out.push_str(&if i + 1 == no { f(l) } else { l.to_string() });
            out.push('\n');
        }
        out.into_bytes()
    }

    #[test]
    fn a_one_bank_replay_checks_other_columns_only_to_name_an_altered_entry() {
        let good = parse_ascii(RK_LIST).unwrap();
        let policy = policy_of(&good);
        let sha256 = ImaState::new(None, None, &[HashAlg::Sha256]);
        let pcr256 = replay(&good, HashAlg::Sha256);
        let pcr1 = replay(&good, HashAlg::Sha1);
        let q256 = [(HashAlg::Sha256, pcr256.as_slice())];
        let both = [
            (HashAlg::Sha1, pcr1.as_slice()),
            (HashAlg::Sha256, pcr256.as_slice()),
        ];
        let runs = |input: &[u8], first_line: usize, start: &ImaState, q: &[(HashAlg, &[u8])]| {
            let one = replay_ascii_to_quote(input, first_line, start, q, 1);
            for (threads, piece) in [(2, 1), (2, 150), (3, 7000)] {
                let par = replay_ascii_pieces(input, first_line, start, q, threads, piece);
                assert_eq!(par, one, "{threads} threads, pieces of {piece} bytes");
            }
            one
        };
        // Only the SHA-1 column of line 413 is wrong: SHA-256 alone is
        // quoted and vouches for the data, so nothing fails; with SHA-1
        // quoted too, the column is computed anyway and the entry fails.
        let column = edit_line(413, |l| {
            let (pcr, rest) = l.split_once(' ').unwrap();
            let flip = if rest.starts_with('0') { "1" } else { "0" };
            format!("{pcr} {flip}{}", &rest[1..])
        });
        let r = runs(&column, 1, &sha256, &q256).unwrap();
        assert_eq!(r.len(), good.len());
        let out = judge_replayed(&r, &policy, 1).unwrap();
        assert!(out.ok(), "{:?}", out.failures.first());
        let r = runs(&column, 1, &sha256, &both).unwrap();
        let out = judge_replayed(&r, &policy, 1).unwrap();
        assert_eq!(out.failures_total, 1);
        let f = &out.failures[0];
        assert_eq!(
            (f.code, f.line, f.index),
            (FailureCode::TemplateHashMismatch, 413, 413)
        );

        // Line 500's path changed, its logged hash left: the replay misses
        // the quote and names the entry, in one bank or two.
        let path = good[499].name().into_owned();
        let data = edit_line(500, |l| format!("{l}.evil"));
        for q in [&q256[..], &both[..]] {
            let Err(ReplayFailure::Mismatch(m)) = runs(&data, 1, &sha256, q) else {
                panic!("an altered list reached the quote");
            };
            let a = m.altered.expect("the altered entry is named");
            assert_eq!((a.index, a.line), (500, 500));
            assert_eq!(a.path, format!("{path}.evil"));
            assert_eq!(a.alg, HashAlg::Sha1);
            assert_eq!(a.logged, good[499].template_hash.as_slice());
            assert_ne!(a.computed, a.logged);
            assert!(a.to_string().contains("entry 500 (line 500,"), "{a}");
        }
        // In a continuation, numbered in the whole list.
        let mut state = sha256.clone();
        state.banks[0].pcr10 = replay(&good[..400], HashAlg::Sha256);
        state.entries_verified = 400;
        let tail: Vec<u8> = data
            .split_inclusive(|b| *b == b'\n')
            .skip(400)
            .flatten()
            .copied()
            .collect();
        let Err(ReplayFailure::Mismatch(m)) = runs(&tail, 401, &state, &q256) else {
            panic!("an altered continuation reached the quote");
        };
        let a = m.altered.unwrap();
        assert_eq!((a.index, a.line), (500, 500));
        // Entries swapped, each consistent with its logged hash: the
        // replay misses, and no entry can be named.
        let mut swapped = good.clone();
        swapped.swap(10, 11);
        let text = encode_ascii(&swapped);
        let Err(ReplayFailure::Mismatch(m)) = runs(text.as_bytes(), 1, &sha256, &q256) else {
            panic!("a reordered list reached the quote");
        };
        assert_eq!(m.altered, None);
    }

    fn two_banks() -> ImaState {
        ImaState::new(Some("b".into()), Some(1), &[HashAlg::Sha1])
    }

    #[test]
    fn table_hex_and_word_at_a_time_newlines_agree_with_the_simple_ones() {
        let digits = b"0123456789abcdefABCDEF";
        let mut s: Vec<u8> = (0..128).map(|i| digits[(i * 7) % digits.len()]).collect();
        for len in [2, 8, 10, 40, 64, 96, 126, 128] {
            assert_eq!(
                hex_digest(&s[..len]).map(|d| d.as_slice().to_vec()),
                hex::decode(&s[..len]).ok(),
            );
        }
        // Every byte value at every position of a word and of the tail.
        for pos in [0, 1, 5, 7, 8, 33, 40, 41] {
            for b in 0..=255u8 {
                let keep = s[pos];
                s[pos] = b;
                let want = hex::decode(&s[..42]).ok();
                assert_eq!(
                    hex_digest(&s[..42]).map(|d| d.as_slice().to_vec()),
                    want,
                    "byte {b:#x} at {pos}"
                );
                s[pos] = keep;
            }
        }
        for input in [
            &b""[..],
            b"\n",
            b"abc",
            b"abcdefgh\n",
            b"abcdefg\nh",
            b"\n\n1234567890\n12345678901234567\nxyz\n",
            "\u{100a}\n\u{a0a}\n".as_bytes(),
            &[0x8a, 0x0a, 0x0b, 0x8a, 0x8a, 0x8a, 0x8a, 0x8a, 0x8a, 0x0a],
        ] {
            let want: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
            assert_eq!(lines(input).collect::<Vec<_>>(), want);
            for byte in [b' ', b'\n', 0x8a, 0, 0xff] {
                let want = input.iter().position(|b| *b == byte);
                assert_eq!(find_byte(input, byte), want);
            }
        }
    }

    #[test]
    fn short_digests_equal_the_streaming_ones() {
        use sha2::Digest as _;
        let msg: Vec<u8> = (0..300u32).map(|i| (i * 31 + 7) as u8).collect();
        for len in 0..=200 {
            let m = &msg[..len];
            // Split in two parts as an extend passes them.
            let parts: [&[u8]; 2] = [&m[..len / 3], &m[len / 3..]];
            assert_eq!(
                digest(HashAlg::Sha1, &parts).as_slice(),
                sha1::Sha1::digest(m).as_slice(),
                "sha1 {len}"
            );
            assert_eq!(
                digest(HashAlg::Sha256, &parts).as_slice(),
                sha2::Sha256::digest(m).as_slice(),
                "sha256 {len}"
            );
            assert_eq!(
                digest(HashAlg::Sha384, &parts).as_slice(),
                sha2::Sha384::digest(m).as_slice()
            );
            // In one part, as template data: a whole first block is read
            // in place, the rest padded.
            for alg in [HashAlg::Sha1, HashAlg::Sha256] {
                assert_eq!(
                    digest(alg, &[m]),
                    digest(alg, &parts),
                    "{alg} {len}, one part"
                );
            }
        }
    }

    #[test]
    fn split_lines_cuts_after_newlines_and_covers_the_input() {
        for input in [&b""[..], b"a", b"a\n", b"ab\ncd\n\nef", b"\n\n\n"] {
            for piece in [1, 2, 3, 100] {
                let r = split_lines(input, piece);
                assert_eq!(r.first().map_or(0, |r| r.start), 0);
                assert_eq!(r.last().map_or(0, |r| r.end), input.len());
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].end > w[0].start);
                    assert_eq!(input[w[0].end - 1], b'\n');
                }
            }
        }
        assert_eq!(split_lines(b"ab\ncd\n", 1), vec![0..3, 3..6]);
        assert_eq!(split_lines(b"ab\ncd\n", 4), vec![0..6]);
    }

    #[test]
    fn parallel_equals_sequential_on_a_passing_list() {
        let good = parse_ascii(RK_LIST).unwrap();
        let policy = policy_of(&good);
        let out = parallel_agrees(RK_LIST, 1, &policy, &two_banks(), HashAlg::Sha256).unwrap();
        assert!(out.ok());
        assert_eq!(out.entries_checked, 826);
        for b in [HashAlg::Sha1, HashAlg::Sha256] {
            assert_eq!(out.new_state.pcr10(b).unwrap(), replay(&good, b).as_slice());
        }
        // A continuation from line 401, after 400 verified entries.
        let text = std::str::from_utf8(RK_LIST).unwrap();
        let tail: String = text.lines().skip(400).map(|l| format!("{l}\n")).collect();
        let first = verify(&good[..400], &policy, &two_banks(), HashAlg::Sha256).unwrap();
        let second = parallel_agrees(
            tail.as_bytes(),
            401,
            &policy,
            &first.new_state,
            HashAlg::Sha256,
        )
        .unwrap();
        assert_eq!(second.new_state, out.new_state);
        // Nothing to verify, or only empty lines.
        for empty in [&b""[..], b"\n", b"\n\r\n\n"] {
            let out = parallel_agrees(empty, 7, &policy, &two_banks(), HashAlg::Sha256).unwrap();
            assert_eq!(out.entries_checked, 0);
        }
        // Empty lines and CRLF endings change line numbers, not entries.
        let crlf = text.replace('\n', "\r\n\n");
        let out =
            parallel_agrees(crlf.as_bytes(), 1, &policy, &two_banks(), HashAlg::Sha1).unwrap();
        assert!(out.ok());
        assert_eq!(out.entries_checked, 826);
    }

    #[test]
    fn a_name_ending_in_carriage_return_survives_the_ascii_round_trip() {
        // Fuzzing finding (docs/security.md): the line `... {},\r\r\n`
        // parses to a name ending in `\r` (one `\r` is the CRLF ending);
        // encoding it must keep that `\r`.
        let line = "10 753fcbc39d3234266cae396bebb3b6e5b0974f36 ima-ng sha1:98092c53c80882d555bfd54cd4d5c03f0885f391 /etc/ld.so.cache {},\r\r\n";
        let entries = parse_ascii(line.as_bytes()).unwrap();
        assert_eq!(entries[0].name(), "/etc/ld.so.cache {},\r");
        let text = encode_ascii(&entries);
        assert!(text.ends_with("{},\r\r\n"), "{text:?}");
        let again = parse_ascii(text.as_bytes()).unwrap();
        assert_eq!(again[0].name(), entries[0].name());
        assert_eq!(again, entries);
        // A kernel list is never CRLF: there a file name ending in `\r` loses
        // it, and its entry fails closed on the template hash.
        let e = make_entry(Template::ImaNg, HashAlg::Sha256, &[7; 32], "/tmp/x\r", &[]).unwrap();
        let ours = encode_ascii(std::slice::from_ref(&e));
        let kernel = format!(
            "{}\n",
            ours.trim_end_matches('\n').strip_suffix('\r').unwrap()
        );
        assert!(kernel.ends_with("/tmp/x\r\n"));
        let read = parse_ascii(kernel.as_bytes()).unwrap();
        assert_eq!(read[0].name(), "/tmp/x");
        assert_ne!(
            read[0].template_hash_for(HashAlg::Sha1).as_slice(),
            e.template_hash.as_slice()
        );
    }

    #[test]
    fn parallel_equals_sequential_on_each_kind_of_failure() {
        let good = parse_ascii(RK_LIST).unwrap();
        let policy = policy_of(&good);
        let start = two_banks();
        let bank = HashAlg::Sha256;
        let fails = |input: &[u8], policy: &RuntimePolicy| {
            let out = parallel_agrees(input, 1, policy, &start, bank).unwrap();
            assert!(!out.ok());
            out
        };
        // A tampered template hash: first, middle and last line.
        for no in [1, 2, 413, 826] {
            let list = edit_line(no, |l| {
                let (pcr, rest) = l.split_once(' ').unwrap();
                let flip = if rest.starts_with('0') { "1" } else { "0" };
                format!("{pcr} {flip}{}", &rest[1..])
            });
            let out = fails(&list, &policy);
            assert_eq!(out.failures_total, 1);
            let f = &out.failures[0];
            assert_eq!((f.line, f.index), (no, no as u64));
            assert_eq!(f.code, FailureCode::TemplateHashMismatch);
        }
        // Unknown paths: a policy without some entries (more than the
        // reported maximum fail, spread over every piece).
        let partial = policy_of(&good[..300]);
        let out = fails(RK_LIST, &partial);
        assert!(out.failures_total > MAX_REPORTED_FAILURES as u64);
        assert_eq!(out.failures.len(), MAX_REPORTED_FAILURES);
        assert!(out
            .failures
            .iter()
            .any(|f| f.code == FailureCode::NotInPolicy));
        assert!(out.failures.windows(2).all(|w| w[0].index < w[1].index));
        // A wrong digest for one path in the middle.
        let target = &good[500];
        let mut doc = policy.document().clone();
        doc.digests.insert(
            target.name().into_owned(),
            vec![format!(
                "{}:{}",
                target.digest_alg,
                "ab".repeat(target.digest().len())
            )],
        );
        let out = fails(RK_LIST, &RuntimePolicy::new(doc));
        assert!(out
            .failures
            .iter()
            .all(|f| f.code == FailureCode::DigestMismatch && f.path == target.name()));
        assert!(out.failures.iter().any(|f| f.line == 501));
        // Violations (all-zero template hash) extend all ones: allowed or not.
        let zero = "0".repeat(40);
        let list = edit_line(600, |l| {
            let (pcr, rest) = l.split_once(' ').unwrap();
            format!("{pcr} {zero}{}", &rest[40..])
        });
        let mut doc = policy.document().clone();
        doc.allow_violations = false;
        let out = fails(&list, &RuntimePolicy::new(doc));
        assert_eq!(out.failures_total, 1);
        assert_eq!(
            (out.failures[0].line, out.failures[0].code),
            (600, FailureCode::Violation)
        );
        let allowed = parallel_agrees(&list, 1, &policy, &start, bank).unwrap();
        assert!(allowed.ok());
        let entries = parse_ascii(&list).unwrap();
        assert!(entries[599].is_violation());
        assert_eq!(
            allowed.new_state.pcr10(bank).unwrap(),
            replay(&entries, bank).as_slice()
        );
        assert_ne!(
            allowed.new_state.pcr10(bank).unwrap(),
            replay(&good, bank).as_slice()
        );
        // Not PCR 10.
        let list = edit_line(700, |l| format!("11{}", &l[2..]));
        let out = fails(&list, &policy);
        assert_eq!(out.failures[0].code, FailureCode::UnexpectedPcr);
        assert_eq!(out.failures[0].line, 700);
    }

    #[test]
    fn replay_stops_where_the_quote_does_and_refuses_a_list_that_never_reaches_it() {
        let good = parse_ascii(RK_LIST).unwrap();
        let start = two_banks();
        let q1 = replay(&good[..300], HashAlg::Sha1);
        let q256 = replay(&good[..300], HashAlg::Sha256);
        let quoted = [
            (HashAlg::Sha256, q256.as_slice()),
            (HashAlg::Sha1, q1.as_slice()),
        ];
        let r = replay_to_quote(good.clone(), &start, &quoted).unwrap();
        assert_eq!(r.len(), 300);
        assert_eq!(
            r.entries().map(|e| e.to_entry()).collect::<Vec<_>>(),
            good[..300]
        );
        assert_eq!(r.end.entries_verified, 300);
        assert_eq!(r.end.pcr10(HashAlg::Sha256), Some(q256.as_slice()));
        assert_eq!(r.end.pcr10(HashAlg::Sha1), Some(q1.as_slice()));
        // Kept in pieces (here of ~one line, blank lines among them: empty
        // blocks), cut inside the block holding entry 300; each entry found
        // by index with its line in the whole list.
        let mut text = RK_LIST.to_vec();
        let at = text.iter().position(|b| *b == b'\n').unwrap() + 1;
        text.splice(at..at, *b"\n\n");
        for piece in [1, 500, 4096] {
            let p = replay_ascii_pieces(&text, 1, &start, &quoted, 2, piece).unwrap();
            assert_eq!(p.len(), 300, "piece {piece}");
            let lines: Vec<usize> = p.entries().map(|e| e.line).collect();
            let expected: Vec<usize> = good[..300]
                .iter()
                .map(|e| if e.line == 1 { 1 } else { e.line + 2 })
                .collect();
            assert_eq!(lines, expected, "piece {piece}");
            for i in [0, 1, 150, 299] {
                let e = p.entry(i).unwrap().to_entry();
                assert_eq!((e.line, e.name()), (expected[i], good[i].name()));
                assert_eq!(e.template_data(), good[i].template_data());
            }
            assert!(p.entry(300).is_none());
            assert_eq!(p.end, r.end);
        }
        // Continued from there: the rest, with the stored state.
        let full = replay(&good, HashAlg::Sha256);
        let rest = replay_to_quote(
            good[300..].to_vec(),
            &r.end,
            &[(HashAlg::Sha256, full.as_slice())],
        )
        .unwrap();
        assert_eq!(rest.len(), good.len() - 300);
        assert_eq!(rest.end.entries_verified, good.len() as u64);
        // A quote the state is already at covers nothing.
        let none = replay_to_quote(good.clone(), &r.end, &quoted).unwrap();
        assert!(none.is_empty());
        // Every bank must agree: one bank's value from another prefix never does.
        let other = replay(&good[..301], HashAlg::Sha1);
        let e = replay_to_quote(
            good.clone(),
            &start,
            &[
                (HashAlg::Sha256, q256.as_slice()),
                (HashAlg::Sha1, other.as_slice()),
            ],
        )
        .unwrap_err();
        assert_eq!((e.bank, e.entries), (HashAlg::Sha256, good.len()));
        assert_eq!(e.replayed, full);
        assert_eq!(e.replayed_from, vec![0u8; 32]);
        assert_eq!(e.quoted, q256);
        let both = [
            (HashAlg::Sha256, q256.as_slice()),
            (HashAlg::Sha1, other.as_slice()),
        ];
        assert_eq!(
            replay_ascii_pieces(RK_LIST, 1, &start, &both, 2, 97),
            Err(ReplayFailure::Mismatch(e))
        );
        // Two lines swapped: the quote of the true order is never reached.
        let mut swapped = good.clone();
        swapped.swap(10, 11);
        let e = replay_to_quote(swapped, &start, &[(HashAlg::Sha256, full.as_slice())]);
        assert!(e.is_err());
    }

    #[test]
    fn parallel_replays_in_list_order() {
        // Two lines swapped: each entry is fine, the PCR is not the quoted one.
        let good = parse_ascii(RK_LIST).unwrap();
        let policy = policy_of(&good);
        let text = std::str::from_utf8(RK_LIST).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.swap(100, 700);
        let swapped: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let start = two_banks();
        for bank in [HashAlg::Sha1, HashAlg::Sha256] {
            let out = parallel_agrees(swapped.as_bytes(), 1, &policy, &start, bank).unwrap();
            assert!(out.ok());
            let quoted = replay(&good, bank);
            assert!(out.new_state.matches_quote(bank, &quoted).is_err());
            let right = parallel_agrees(RK_LIST, 1, &policy, &start, bank).unwrap();
            assert!(right.new_state.matches_quote(bank, &quoted).is_ok());
        }
    }

    #[test]
    fn parallel_reports_the_first_bad_line_with_its_numbers() {
        let good = parse_ascii(RK_LIST).unwrap();
        let policy = policy_of(&good);
        let start = two_banks();
        let bank = HashAlg::Sha256;
        // Empty lines before the bad one make entry and line numbers differ.
        let text = std::str::from_utf8(RK_LIST).unwrap();
        let with_blanks = |bad_at: usize, bad: &str, also: Option<(usize, &str)>| {
            let mut out = String::from("\n\n");
            for (i, l) in text.lines().enumerate() {
                let no = i + 1;
                if no == bad_at {
                    out.push_str(bad);
                } else if also.is_some_and(|(a, _)| a == no) {
                    out.push_str(also.unwrap().1);
                } else {
                    out.push_str(l);
                }
                out.push('\n');
            }
            out.into_bytes()
        };
        let err = |input: &[u8]| parallel_agrees(input, 1, &policy, &start, bank).unwrap_err();
        // Malformed in a middle piece; a second bad line later loses.
        let e = err(&with_blanks(
            400,
            "10 zz ima-ng sha1:00 /x",
            Some((700, "garbage")),
        ));
        assert_eq!(
            e,
            ImaError::Malformed {
                line: 402,
                field: "template hash",
                detail: "not a 20/32/48/64-byte hex digest".into()
            }
        );
        // Unsupported template and algorithm carry the entry number too.
        let th = "0".repeat(39) + "1";
        let e = err(&with_blanks(
            555,
            &format!("10 {th} ima-xyz sha1:{} /x", "00".repeat(20)),
            None,
        ));
        assert_eq!(
            e,
            ImaError::UnsupportedTemplate {
                entry: 555,
                line: 557,
                name: "ima-xyz".into()
            }
        );
        let e = err(&with_blanks(
            826,
            &format!("10 {th} ima-ng md5:{} /x", "00".repeat(16)),
            None,
        ));
        assert_eq!(
            e,
            ImaError::UnsupportedAlgorithm {
                entry: 826,
                line: 828,
                name: "md5".into()
            }
        );
        // Too long and not UTF-8.
        let long = "x".repeat(MAX_ASCII_LINE + 1);
        let e = err(&with_blanks(300, &long, None));
        assert_eq!(
            e,
            ImaError::LineTooLong {
                line: 302,
                len: MAX_ASCII_LINE + 1,
                max: MAX_ASCII_LINE
            }
        );
        // Not UTF-8: at line 1 (after the blanks, line 3) and line 600.
        let both = with_blanks(1, "BAD-ONE", Some((600, "BAD-TWO")));
        let mark = |input: &[u8], which: &[u8]| {
            let mut b = input.to_vec();
            let at = b.windows(7).position(|w| w == which).unwrap();
            b[at] = 0xff;
            b
        };
        let first_only = mark(&both, b"BAD-ONE");
        let second_only = mark(&both, b"BAD-TWO");
        let two = mark(&first_only, b"BAD-TWO");
        assert_eq!(err(&two), ImaError::NotUtf8 { line: 3 });
        assert_eq!(err(&first_only), ImaError::NotUtf8 { line: 3 });
        // (line 1 stays "BAD-ONE", a malformed line, reported first)
        assert_eq!(err(&second_only).code(), "ima_malformed_line");
        let later = with_blanks(600, "BAD-TWO", None);
        assert_eq!(
            err(&mark(&later, b"BAD-TWO")),
            ImaError::NotUtf8 { line: 602 }
        );
    }

    #[test]
    fn public_parallel_entry_point_agrees_on_a_large_list() {
        assert_eq!(parallel_threads(1), 1);
        assert!(parallel_threads(0) >= 1);
        assert!(parallel_threads(2) <= 2);
        let mut entries = Vec::new();
        for i in 0..12_000 {
            let path = format!("/usr/lib/gen/file-{i}.so");
            let d = HashAlg::Sha256.hash(&[path.as_bytes()]);
            entries.push(make_entry(Template::ImaNg, HashAlg::Sha256, &d, &path, &[]).unwrap());
        }
        let text = encode_ascii(&entries);
        assert!(text.len() > PARALLEL_MIN_BYTES);
        let policy = policy_of(&entries[..5000]);
        let start = ImaState::new(None, None, &[]);
        let seq = verify_ascii(text.as_bytes(), 1, &policy, &start, HashAlg::Sha256).unwrap();
        for cap in [0, 1, 2, 8] {
            let par =
                verify_ascii_parallel(text.as_bytes(), 1, &policy, &start, HashAlg::Sha256, cap)
                    .unwrap();
            assert_eq!(par, seq, "cap {cap}");
        }
        assert_eq!(seq.failures_total, 7000);
        assert_eq!(seq.failures[0].line, 5001);
    }
}
