//! Quotes as a TPM makes them: TPMS_ATTEST over the challenge's nonce and
//! PCR selection, signed (ECDSA P-256, SHA-256) by the AK into a
//! TPMT_SIGNATURE; and the garbage a broken or hostile agent sends.

use super::SimError;
use base64::Engine;
use proto::tpm::{Attest, ClockInfo, HashAlg, PcrSelection, QuoteInfo, Signature};
use proto::wire::{Evidence, PcrValues, PcrWhitelist};
use rand::RngCore;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// The PCR a tampered host measures differently (Secure Boot policy).
pub const TAMPERED_PCR: u8 = 7;

/// The value every honest virtual host has in PCR `index` of `bank`.
pub fn golden(bank: HashAlg, index: u8) -> Vec<u8> {
    bank.hash(&[b"attestctl simulate: golden PCR", &[index]])
}

fn tampered(bank: HashAlg, index: u8) -> Vec<u8> {
    bank.hash(&[b"attestctl simulate: tampered PCR", &[index]])
}

/// The PCR a tampered host changes: 7 if selected, else the first selected.
pub fn tampered_index(sel: &PcrSelection) -> Option<u8> {
    let all: Vec<u8> = sel
        .banks
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .collect();
    if all.contains(&TAMPERED_PCR) {
        Some(TAMPERED_PCR)
    } else {
        all.first().copied()
    }
}

/// The whitelist of every virtual host: the golden values of the selection.
pub fn golden_whitelist(sel: &PcrSelection) -> PcrWhitelist {
    sel.banks
        .iter()
        .map(|(bank, pcrs)| {
            (
                *bank,
                pcrs.iter()
                    .map(|i| (*i, vec![hex::encode(golden(*bank, *i))]))
                    .collect(),
            )
        })
        .collect()
}

/// A signed quote of `sel` over `nonce_hex`, with its PCR values.
pub fn quote(
    ak: &ring::signature::EcdsaKeyPair,
    ak_name: &[u8],
    nonce_hex: &str,
    sel: &PcrSelection,
    tamper: bool,
) -> Result<Evidence, SimError> {
    let nonce = hex::decode(nonce_hex).map_err(|e| SimError::Decode {
        what: "challenge nonce",
        detail: e.to_string(),
    })?;
    let changed = if tamper { tampered_index(sel) } else { None };
    let mut pcrs = PcrValues::new();
    let mut in_order = Vec::new();
    for (bank, indices) in &sel.banks {
        for i in indices {
            let v = if Some(*i) == changed {
                tampered(*bank, *i)
            } else {
                golden(*bank, *i)
            };
            pcrs.entry(*bank).or_default().insert(*i, hex::encode(&v));
            in_order.push(v);
        }
    }
    // The AK's nameAlg (SHA-256) hashes the selected values in selection order.
    let pcr_digest = proto::tpm::pcr_digest(HashAlg::Sha256, in_order.iter().map(Vec::as_slice));
    // The TPM clock in ms: wall time keeps it increasing across simulator runs,
    // as the server's rollback check requires.
    let clock = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let attest = Attest {
        qualified_signer: ak_name.to_vec(),
        extra_data: nonce,
        clock_info: ClockInfo {
            clock,
            reset_count: 1,
            restart_count: 0,
            safe: true,
        },
        firmware_version: 0x0001_0002_0003_0004,
        quote: QuoteInfo {
            pcr_select: sel.clone(),
            pcr_digest,
        },
    }
    .encode();
    let sig = ak
        .sign(&ring::rand::SystemRandom::new(), &attest)
        .map_err(|e| SimError::Pki(format!("signing the quote: {e}")))?;
    let (r, s) = sig.as_ref().split_at(sig.as_ref().len() / 2);
    let signature = Signature::Ecdsa {
        hash: HashAlg::Sha256,
        r: r.to_vec(),
        s: s.to_vec(),
    }
    .encode();
    Ok(Evidence {
        nonce: nonce_hex.to_string(),
        attest: B64.encode(attest),
        signature: B64.encode(signature),
        pcrs,
        uefi_log: None,
        ima: None,
    })
}

/// Malformed evidence: the right nonce, random bytes for the quote and signature.
pub fn garbage(nonce_hex: &str, sel: &PcrSelection) -> Evidence {
    let mut rng = rand::thread_rng();
    let mut attest = vec![0u8; 120];
    rng.fill_bytes(&mut attest);
    let mut signature = vec![0u8; 72];
    rng.fill_bytes(&mut signature);
    let mut pcrs = PcrValues::new();
    for (bank, indices) in &sel.banks {
        for i in indices {
            let mut v = vec![0u8; bank.digest_len()];
            rng.fill_bytes(&mut v);
            pcrs.entry(*bank).or_default().insert(*i, hex::encode(v));
        }
    }
    Evidence {
        nonce: nonce_hex.to_string(),
        attest: B64.encode(attest),
        signature: B64.encode(signature),
        pcrs,
        uefi_log: None,
        ima: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify;

    fn selection() -> PcrSelection {
        PcrSelection {
            banks: vec![(HashAlg::Sha256, (0u8..=10).collect())],
        }
    }

    #[test]
    fn quotes_pass_the_servers_decode_signature_and_digest_steps() {
        let key = super::super::fleet::derive_key(&[3; 32], "ak", 1);
        let (ak_public, ak) = super::super::fleet::ak(&key).unwrap();
        let nonce = "11".repeat(32);
        let ev = quote(&ak, &ak_public.name(), &nonce, &selection(), false).unwrap();
        let d = verify::decode(&ev).unwrap();
        verify::verify_signature(&ak_public, &d.signature, &d.attest_bytes).unwrap();
        assert_eq!(d.attest.extra_data, hex::decode(&nonce).unwrap());
        assert_eq!(d.attest.quote.pcr_select, selection());
        // Another AK's signature does not verify.
        let other = super::super::fleet::derive_key(&[3; 32], "ak", 2);
        let (other_public, _) = super::super::fleet::ak(&other).unwrap();
        assert!(verify::verify_signature(&other_public, &d.signature, &d.attest_bytes).is_err());
    }

    #[test]
    fn tampered_quotes_differ_only_in_pcr_7_and_garbage_does_not_decode() {
        let key = super::super::fleet::derive_key(&[3; 32], "ak", 1);
        let (ak_public, ak) = super::super::fleet::ak(&key).unwrap();
        let nonce = "22".repeat(32);
        let honest = quote(&ak, &ak_public.name(), &nonce, &selection(), false).unwrap();
        let bad = quote(&ak, &ak_public.name(), &nonce, &selection(), true).unwrap();
        let (h, b) = (&honest.pcrs[&HashAlg::Sha256], &bad.pcrs[&HashAlg::Sha256]);
        let differing: Vec<u8> = h.keys().filter(|i| h[i] != b[i]).copied().collect();
        assert_eq!(differing, vec![TAMPERED_PCR]);
        // The whitelist lists exactly the honest values.
        let wl = golden_whitelist(&selection());
        for (i, v) in h {
            assert_eq!(wl[&HashAlg::Sha256][i], vec![v.clone()]);
        }
        assert!(verify::decode(&garbage(&nonce, &selection())).is_err());
    }
}
