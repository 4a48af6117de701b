//! Pure-Rust decoding (and encoding) of the TPM 2.0 structures that travel as
//! evidence: TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC and TPML_PCR_SELECTION,
//! in their canonical big-endian marshalling (TPM 2.0 Part 2), which is what
//! `tpm2_quote -m/-s` and `tpm2_createak -u` write.
//!
//! Every decoder works on untrusted bytes: lengths are checked before each
//! read, nothing is preallocated from a length field, and no input panics.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha384, Sha512};
use std::collections::BTreeSet;
use std::fmt;

/// TPM_GENERATED_VALUE: the magic that marks a structure signed by the TPM itself.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_RSASSA: u16 = 0x0014;
const TPM_ALG_RSAPSS: u16 = 0x0016;
const TPM_ALG_ECDSA: u16 = 0x0018;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ECC_NIST_P256: u16 = 0x0003;
const TPM_ECC_NIST_P384: u16 = 0x0004;

/// Highest PCR index of a PC Client TPM (24 PCRs).
pub const MAX_PCR: u8 = 23;

/// Decoding failure, with the structure and the byte offset where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    #[error("{structure}: truncated at byte {offset} (needed {needed} more bytes)")]
    Truncated {
        structure: &'static str,
        offset: usize,
        needed: usize,
    },
    #[error("{structure}: {trailing} unexpected trailing bytes")]
    TrailingBytes {
        structure: &'static str,
        trailing: usize,
    },
    #[error("{structure}: unsupported {field} value 0x{value:04x}")]
    Unsupported {
        structure: &'static str,
        field: &'static str,
        value: u32,
    },
    #[error("{structure}: invalid {field}: {detail}")]
    Invalid {
        structure: &'static str,
        field: &'static str,
        detail: String,
    },
}

/// A PCR bank's hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    pub fn from_tpm(id: u16) -> Option<Self> {
        match id {
            0x0004 => Some(Self::Sha1),
            0x000b => Some(Self::Sha256),
            0x000c => Some(Self::Sha384),
            0x000d => Some(Self::Sha512),
            _ => None,
        }
    }
    pub fn tpm_id(self) -> u16 {
        match self {
            Self::Sha1 => 0x0004,
            Self::Sha256 => 0x000b,
            Self::Sha384 => 0x000c,
            Self::Sha512 => 0x000d,
        }
    }
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "sha1",
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sha1" => Some(Self::Sha1),
            "sha256" => Some(Self::Sha256),
            "sha384" => Some(Self::Sha384),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }
    /// Hash the concatenation of `parts` with this algorithm. SHA-1 serves
    /// PCR banks and names only; signatures over SHA-1 are refused elsewhere.
    pub fn hash(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            h.finalize().to_vec()
        }
        match self {
            Self::Sha1 => run::<sha1::Sha1>(parts),
            Self::Sha256 => run::<Sha256>(parts),
            Self::Sha384 => run::<Sha384>(parts),
            Self::Sha512 => run::<Sha512>(parts),
        }
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Bounds-checked big-endian reader over untrusted bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    structure: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], structure: &'static str) -> Self {
        Self {
            buf,
            pos: 0,
            structure,
        }
    }
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        if self.remaining() < n {
            return Err(TpmError::Truncated {
                structure: self.structure,
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8, TpmError> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, TpmError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A TPM2B: a u16 size followed by that many bytes.
    pub fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    pub fn finish(self) -> Result<(), TpmError> {
        match self.remaining() {
            0 => Ok(()),
            trailing => Err(TpmError::TrailingBytes {
                structure: self.structure,
                trailing,
            }),
        }
    }
    fn unsupported(&self, field: &'static str, value: u32) -> TpmError {
        TpmError::Unsupported {
            structure: self.structure,
            field,
            value,
        }
    }
    fn invalid(&self, field: &'static str, detail: impl Into<String>) -> TpmError {
        TpmError::Invalid {
            structure: self.structure,
            field,
            detail: detail.into(),
        }
    }
}

fn put_tpm2b(out: &mut Vec<u8>, data: &[u8]) {
    // Every TPM2B we emit is far below 64 KiB; clamp rather than panic.
    let len = u16::try_from(data.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data[..len as usize]);
}

/// TPML_PCR_SELECTION: an ordered list of banks, each with a set of PCRs.
/// Order matters: the quote's pcrDigest hashes the PCR values bank by bank in
/// this order, each bank in ascending PCR index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PcrSelection {
    pub banks: Vec<(HashAlg, BTreeSet<u8>)>,
}

impl PcrSelection {
    pub fn decode_from(r: &mut Reader<'_>) -> Result<Self, TpmError> {
        let count = r.u32()?;
        // A TPM has a handful of banks; refuse absurd counts before looping.
        if count > 16 {
            return Err(r.invalid("count", format!("{count} banks")));
        }
        let mut banks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let alg_id = r.u16()?;
            let alg =
                HashAlg::from_tpm(alg_id).ok_or_else(|| r.unsupported("hash", alg_id.into()))?;
            let size = r.u8()? as usize;
            let bitmap = r.bytes(size)?;
            let mut pcrs = BTreeSet::new();
            for (byte_idx, byte) in bitmap.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        let idx = byte_idx * 8 + bit;
                        if idx > MAX_PCR as usize {
                            return Err(
                                r.invalid("pcrSelect", format!("PCR {idx} beyond {MAX_PCR}"))
                            );
                        }
                        pcrs.insert(idx as u8);
                    }
                }
            }
            if banks.iter().any(|(a, _)| *a == alg) {
                return Err(r.invalid("hash", format!("bank {alg} selected twice")));
            }
            banks.push((alg, pcrs));
        }
        Ok(Self { banks })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPML_PCR_SELECTION");
        let sel = Self::decode_from(&mut r)?;
        r.finish()?;
        Ok(sel)
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.banks.len() as u32).to_be_bytes());
        for (alg, pcrs) in &self.banks {
            out.extend_from_slice(&alg.tpm_id().to_be_bytes());
            let mut bitmap = [0u8; 3];
            for &p in pcrs.iter().filter(|p| **p <= MAX_PCR) {
                bitmap[(p / 8) as usize] |= 1 << (p % 8);
            }
            out.push(3);
            out.extend_from_slice(&bitmap);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// The same selection without empty banks, in a canonical (sorted) order:
    /// what two selections must agree on to select the same PCRs.
    pub fn normalized(&self) -> Vec<(HashAlg, BTreeSet<u8>)> {
        let mut v: Vec<_> = self
            .banks
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .cloned()
            .collect();
        v.sort_by_key(|(a, _)| *a);
        v
    }
}

/// TPMS_CLOCK_INFO
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockInfo {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
}

/// TPMS_QUOTE_INFO
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    pub pcr_select: PcrSelection,
    pub pcr_digest: Vec<u8>,
}

/// TPMS_ATTEST, restricted to quotes: any other attestation type is refused,
/// since a certify or time attestation signed by an AK is not a quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    pub qualified_signer: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock_info: ClockInfo,
    pub firmware_version: u64,
    pub quote: QuoteInfo,
}

impl Attest {
    pub fn decode(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPMS_ATTEST");
        let magic = r.u32()?;
        if magic != TPM_GENERATED_VALUE {
            return Err(r.invalid("magic", format!("0x{magic:08x} is not TPM_GENERATED_VALUE")));
        }
        let ty = r.u16()?;
        if ty != TPM_ST_ATTEST_QUOTE {
            return Err(r.unsupported("type", ty.into()));
        }
        let qualified_signer = r.tpm2b()?.to_vec();
        let extra_data = r.tpm2b()?.to_vec();
        let clock_info = ClockInfo {
            clock: r.u64()?,
            reset_count: r.u32()?,
            restart_count: r.u32()?,
            safe: match r.u8()? {
                0 => false,
                1 => true,
                v => return Err(r.invalid("safe", format!("{v} is not a TPMI_YES_NO"))),
            },
        };
        let firmware_version = r.u64()?;
        let pcr_select = PcrSelection::decode_from(&mut r)?;
        let pcr_digest = r.tpm2b()?.to_vec();
        r.finish()?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock_info,
            firmware_version,
            quote: QuoteInfo {
                pcr_select,
                pcr_digest,
            },
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
        out.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
        put_tpm2b(&mut out, &self.qualified_signer);
        put_tpm2b(&mut out, &self.extra_data);
        out.extend_from_slice(&self.clock_info.clock.to_be_bytes());
        out.extend_from_slice(&self.clock_info.reset_count.to_be_bytes());
        out.extend_from_slice(&self.clock_info.restart_count.to_be_bytes());
        out.push(self.clock_info.safe as u8);
        out.extend_from_slice(&self.firmware_version.to_be_bytes());
        self.quote.pcr_select.encode_into(&mut out);
        put_tpm2b(&mut out, &self.quote.pcr_digest);
        out
    }
}

/// TPMT_SIGNATURE, for the schemes an AK may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    RsaSsa {
        hash: HashAlg,
        sig: Vec<u8>,
    },
    RsaPss {
        hash: HashAlg,
        sig: Vec<u8>,
    },
    Ecdsa {
        hash: HashAlg,
        r: Vec<u8>,
        s: Vec<u8>,
    },
}

impl Signature {
    pub fn decode(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPMT_SIGNATURE");
        let alg = r.u16()?;
        let hash_id = r.u16()?;
        let hash =
            HashAlg::from_tpm(hash_id).ok_or_else(|| r.unsupported("hash", hash_id.into()))?;
        let sig = match alg {
            TPM_ALG_RSASSA => Self::RsaSsa {
                hash,
                sig: r.tpm2b()?.to_vec(),
            },
            TPM_ALG_RSAPSS => Self::RsaPss {
                hash,
                sig: r.tpm2b()?.to_vec(),
            },
            TPM_ALG_ECDSA => Self::Ecdsa {
                hash,
                r: r.tpm2b()?.to_vec(),
                s: r.tpm2b()?.to_vec(),
            },
            other => return Err(r.unsupported("sigAlg", other.into())),
        };
        r.finish()?;
        Ok(sig)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(264);
        match self {
            Self::RsaSsa { hash, sig } | Self::RsaPss { hash, sig } => {
                let alg = if matches!(self, Self::RsaSsa { .. }) {
                    TPM_ALG_RSASSA
                } else {
                    TPM_ALG_RSAPSS
                };
                out.extend_from_slice(&alg.to_be_bytes());
                out.extend_from_slice(&hash.tpm_id().to_be_bytes());
                put_tpm2b(&mut out, sig);
            }
            Self::Ecdsa { hash, r, s } => {
                out.extend_from_slice(&TPM_ALG_ECDSA.to_be_bytes());
                out.extend_from_slice(&hash.tpm_id().to_be_bytes());
                put_tpm2b(&mut out, r);
                put_tpm2b(&mut out, s);
            }
        }
        out
    }

    pub fn hash(&self) -> HashAlg {
        match self {
            Self::RsaSsa { hash, .. } | Self::RsaPss { hash, .. } | Self::Ecdsa { hash, .. } => {
                *hash
            }
        }
    }

    pub fn scheme_name(&self) -> &'static str {
        match self {
            Self::RsaSsa { .. } => "rsassa",
            Self::RsaPss { .. } => "rsapss",
            Self::Ecdsa { .. } => "ecdsa",
        }
    }
}

/// TPMA_OBJECT bits the server cares about.
pub mod attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
}

/// Elliptic curves a key may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EccCurve {
    NistP256,
    NistP384,
}

/// The public part of a key, as far as verification needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Rsa {
        /// Modulus, big-endian.
        modulus: Vec<u8>,
        /// Public exponent (the TPM's 0 already replaced by 65537).
        exponent: u32,
        key_bits: u16,
    },
    Ecc {
        curve: EccCurve,
        x: Vec<u8>,
        y: Vec<u8>,
    },
}

/// The scheme a key is fixed to (TPM_ALG_NULL means "any", chosen at signing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyScheme {
    Null,
    RsaSsa(HashAlg),
    RsaPss(HashAlg),
    Ecdsa(HashAlg),
    Other(u16),
}

/// TPMT_PUBLIC (decoded from a TPM2B_PUBLIC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    pub name_alg: HashAlg,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    pub scheme: KeyScheme,
    pub key: PublicKey,
    /// The exact TPMT_PUBLIC bytes, from which the object's name is computed.
    pub tpmt_bytes: Vec<u8>,
}

impl Public {
    /// Decode a TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC).
    pub fn decode(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut outer = Reader::new(bytes, "TPM2B_PUBLIC");
        let inner = outer.tpm2b()?;
        outer.finish()?;
        Self::decode_tpmt(inner)
    }

    /// Decode a bare TPMT_PUBLIC.
    pub fn decode_tpmt(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes, "TPMT_PUBLIC");
        let ty = r.u16()?;
        let name_id = r.u16()?;
        let name_alg =
            HashAlg::from_tpm(name_id).ok_or_else(|| r.unsupported("nameAlg", name_id.into()))?;
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b()?.to_vec();
        // TPMT_SYM_DEF_OBJECT: only storage keys have one; skip it faithfully.
        let sym = r.u16()?;
        if sym != TPM_ALG_NULL {
            r.u16()?; // keyBits
            r.u16()?; // mode
        }
        let scheme = read_scheme(&mut r)?;
        let key = match ty {
            TPM_ALG_RSA => {
                let key_bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65537,
                    e => e,
                };
                let modulus = r.tpm2b()?.to_vec();
                if modulus.len() * 8 != key_bits as usize {
                    return Err(r.invalid(
                        "unique",
                        format!(
                            "modulus of {} bytes for a {key_bits}-bit key",
                            modulus.len()
                        ),
                    ));
                }
                PublicKey::Rsa {
                    modulus,
                    exponent,
                    key_bits,
                }
            }
            TPM_ALG_ECC => {
                let curve_id = r.u16()?;
                let curve = match curve_id {
                    TPM_ECC_NIST_P256 => EccCurve::NistP256,
                    TPM_ECC_NIST_P384 => EccCurve::NistP384,
                    other => return Err(r.unsupported("curveID", other.into())),
                };
                let kdf = r.u16()?;
                if kdf != TPM_ALG_NULL {
                    r.u16()?;
                }
                let x = r.tpm2b()?.to_vec();
                let y = r.tpm2b()?.to_vec();
                PublicKey::Ecc { curve, x, y }
            }
            other => return Err(r.unsupported("type", other.into())),
        };
        r.finish()?;
        Ok(Self {
            name_alg,
            attributes,
            auth_policy,
            scheme,
            key,
            tpmt_bytes: bytes.to_vec(),
        })
    }

    /// The TPM object name: nameAlg (2 bytes) followed by H(TPMT_PUBLIC).
    pub fn name(&self) -> Vec<u8> {
        let mut name = self.name_alg.tpm_id().to_be_bytes().to_vec();
        name.extend(self.name_alg.hash(&[&self.tpmt_bytes]));
        name
    }

    /// Marshal as TPM2B_PUBLIC.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.tpmt_bytes.len() + 2);
        put_tpm2b(&mut out, &self.tpmt_bytes);
        out
    }

    pub fn has(&self, bit: u32) -> bool {
        self.attributes & bit != 0
    }
}

fn read_scheme(r: &mut Reader<'_>) -> Result<KeyScheme, TpmError> {
    let scheme = r.u16()?;
    if scheme == TPM_ALG_NULL {
        return Ok(KeyScheme::Null);
    }
    let hash_id = r.u16()?;
    let hash = HashAlg::from_tpm(hash_id);
    Ok(match (scheme, hash) {
        (TPM_ALG_RSASSA, Some(h)) => KeyScheme::RsaSsa(h),
        (TPM_ALG_RSAPSS, Some(h)) => KeyScheme::RsaPss(h),
        (TPM_ALG_ECDSA, Some(h)) => KeyScheme::Ecdsa(h),
        (other, _) => KeyScheme::Other(other),
    })
}

/// Build the TPMT_PUBLIC of a restricted signing key (an AK template as
/// `tpm2_createak` makes it). Used by tests and by the fleet simulator.
pub fn ak_public(key: PublicKey, scheme: KeyScheme) -> Public {
    let attributes = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::USER_WITH_AUTH
        | attr::RESTRICTED
        | attr::SIGN_ENCRYPT;
    let mut t = Vec::with_capacity(300);
    let ty = match key {
        PublicKey::Rsa { .. } => TPM_ALG_RSA,
        PublicKey::Ecc { .. } => TPM_ALG_ECC,
    };
    t.extend_from_slice(&ty.to_be_bytes());
    t.extend_from_slice(&HashAlg::Sha256.tpm_id().to_be_bytes());
    t.extend_from_slice(&attributes.to_be_bytes());
    put_tpm2b(&mut t, &[]);
    t.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
    match scheme {
        KeyScheme::Null | KeyScheme::Other(_) => t.extend_from_slice(&TPM_ALG_NULL.to_be_bytes()),
        KeyScheme::RsaSsa(h) | KeyScheme::RsaPss(h) | KeyScheme::Ecdsa(h) => {
            let id = match scheme {
                KeyScheme::RsaSsa(_) => TPM_ALG_RSASSA,
                KeyScheme::RsaPss(_) => TPM_ALG_RSAPSS,
                _ => TPM_ALG_ECDSA,
            };
            t.extend_from_slice(&id.to_be_bytes());
            t.extend_from_slice(&h.tpm_id().to_be_bytes());
        }
    }
    match &key {
        PublicKey::Rsa {
            modulus,
            exponent,
            key_bits,
        } => {
            t.extend_from_slice(&key_bits.to_be_bytes());
            let e = if *exponent == 65537 { 0 } else { *exponent };
            t.extend_from_slice(&e.to_be_bytes());
            put_tpm2b(&mut t, modulus);
        }
        PublicKey::Ecc { curve, x, y } => {
            let id = match curve {
                EccCurve::NistP256 => TPM_ECC_NIST_P256,
                EccCurve::NistP384 => TPM_ECC_NIST_P384,
            };
            t.extend_from_slice(&id.to_be_bytes());
            t.extend_from_slice(&TPM_ALG_NULL.to_be_bytes());
            put_tpm2b(&mut t, x);
            put_tpm2b(&mut t, y);
        }
    }
    Public {
        name_alg: HashAlg::Sha256,
        attributes,
        auth_policy: Vec::new(),
        scheme,
        key,
        tpmt_bytes: t,
    }
}

/// The digest a quote's pcrDigest must equal: the selected PCR values
/// concatenated in selection order, hashed with the signing key's nameAlg
/// (in practice, the hash of the signature scheme).
pub fn pcr_digest<'a>(
    hash: HashAlg,
    values_in_order: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let parts: Vec<&[u8]> = values_in_order.into_iter().collect();
    hash.hash(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_concatenates_parts() {
        assert_eq!(
            hex::encode(HashAlg::Sha1.hash(&[b"a", b"bc"])),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            HashAlg::Sha256.hash(&[b"ab", b"c"]),
            HashAlg::Sha256.hash(&[b"abc"])
        );
    }

    #[test]
    fn pcr_selection_round_trips() {
        let sel = PcrSelection {
            banks: vec![(HashAlg::Sha256, [0u8, 7, 10, 23].into_iter().collect())],
        };
        let bytes = sel.encode();
        assert_eq!(bytes, [0, 0, 0, 1, 0, 0x0b, 3, 0x81, 0x04, 0x80]);
        assert_eq!(PcrSelection::decode(&bytes).unwrap(), sel);
    }

    #[test]
    fn truncations_are_errors_not_panics() {
        let attest = Attest {
            qualified_signer: vec![0; 34],
            extra_data: vec![1; 32],
            clock_info: ClockInfo::default(),
            firmware_version: 7,
            quote: QuoteInfo {
                pcr_select: PcrSelection {
                    banks: vec![(HashAlg::Sha256, [1u8].into_iter().collect())],
                },
                pcr_digest: vec![2; 32],
            },
        };
        let bytes = attest.encode();
        assert_eq!(Attest::decode(&bytes).unwrap(), attest);
        for cut in 0..bytes.len() {
            assert!(Attest::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Attest::decode(&longer),
            Err(TpmError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn pcr_index_beyond_23_is_refused() {
        let bytes = [0, 0, 0, 1, 0, 0x0b, 4, 0, 0, 0, 1];
        assert!(matches!(
            PcrSelection::decode(&bytes),
            Err(TpmError::Invalid { .. })
        ));
    }
}
