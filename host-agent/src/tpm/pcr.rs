//! PCR selections between the wire form and tss-esapi, and reading PCRs.

use crate::error::Error;
use proto::tpm::MAX_PCR;
use proto::wire::PcrSelectionMap;
use proto::HashAlg;
use std::collections::{BTreeMap, BTreeSet};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{PcrSelectSize, PcrSelection, PcrSelectionList, PcrSlot};
use tss_esapi::tss2_esys::TPML_PCR_SELECTION;
use tss_esapi::Context;

/// A checked selection: banks in name order, each a non-empty set.
pub(crate) type Selection = BTreeMap<HashAlg, BTreeSet<u8>>;
/// PCR values read from the TPM, per bank and index.
pub(crate) type Values = BTreeMap<HashAlg, BTreeMap<u8, Vec<u8>>>;

/// Check a selection requested by the server. Quoting a silently trimmed
/// selection would only fail verification later, so refuse it here.
pub(crate) fn checked_selection(map: &PcrSelectionMap) -> Result<Selection, Error> {
    let bad = |problem: String| Error::Challenge {
        field: "pcr_selection",
        problem,
    };
    let mut out = Selection::new();
    for (alg, pcrs) in map {
        if pcrs.is_empty() {
            continue;
        }
        let mut set = BTreeSet::new();
        for &p in pcrs {
            if p > MAX_PCR {
                return Err(bad(format!("{alg} PCR {p} is beyond {MAX_PCR}")));
            }
            set.insert(p);
        }
        out.insert(*alg, set);
    }
    if out.is_empty() {
        return Err(bad("selects no PCR".into()));
    }
    Ok(out)
}

pub(crate) fn hashing_algorithm(alg: HashAlg) -> HashingAlgorithm {
    match alg {
        HashAlg::Sha1 => HashingAlgorithm::Sha1,
        HashAlg::Sha256 => HashingAlgorithm::Sha256,
        HashAlg::Sha384 => HashingAlgorithm::Sha384,
        HashAlg::Sha512 => HashingAlgorithm::Sha512,
    }
}

fn hash_alg(alg: HashingAlgorithm) -> Option<HashAlg> {
    match alg {
        HashingAlgorithm::Sha1 => Some(HashAlg::Sha1),
        HashingAlgorithm::Sha256 => Some(HashAlg::Sha256),
        HashingAlgorithm::Sha384 => Some(HashAlg::Sha384),
        HashingAlgorithm::Sha512 => Some(HashAlg::Sha512),
        _ => None,
    }
}

fn slot(index: u8) -> Result<PcrSlot, Error> {
    let bit = 1u32
        .checked_shl(index.into())
        .ok_or_else(|| Error::tpm("PCR selection", format!("no PCR {index}")))?;
    PcrSlot::try_from(bit).map_err(|e| Error::tpm("PCR selection", e))
}

fn index(slot: PcrSlot) -> u8 {
    // A PcrSlot is a single bit; its position is the PCR index (< 32).
    u32::from(slot).trailing_zeros() as u8
}

/// The tss-esapi selection list, banks in the order of `sel` (the builder
/// uses a HashMap, whose order would make the quote's bank order random).
pub(crate) fn selection_list(sel: &Selection) -> Result<PcrSelectionList, Error> {
    let mut tpml = TPML_PCR_SELECTION::default();
    if sel.len() > tpml.pcrSelections.len() {
        return Err(Error::tpm("PCR selection", "too many banks"));
    }
    for (i, (alg, pcrs)) in sel.iter().enumerate() {
        let slots = pcrs
            .iter()
            .map(|p| slot(*p))
            .collect::<Result<Vec<_>, _>>()?;
        let selection =
            PcrSelection::create(hashing_algorithm(*alg), PcrSelectSize::ThreeOctets, &slots)
                .map_err(|e| Error::tpm("PCR selection", e))?;
        tpml.pcrSelections[i] = selection.into();
        tpml.count += 1;
    }
    PcrSelectionList::try_from(tpml).map_err(|e| Error::tpm("PCR selection", e))
}

/// Read every PCR of `sel`. A TPM answers at most 8 digests per
/// TPM2_PCR_Read, so read until all are in; a bank the TPM does not have
/// comes back empty, which is an error here rather than an endless loop.
pub(crate) fn read(ctx: &mut Context, sel: &Selection) -> Result<Values, Error> {
    let mut remaining = sel.clone();
    let mut values = Values::new();
    let total: usize = sel.values().map(BTreeSet::len).sum();
    // Each read returns at least one PCR, or we stop with an error.
    for _ in 0..=total {
        if remaining.is_empty() {
            return Ok(values);
        }
        let list = selection_list(&remaining)?;
        let (_, read_sel, digests) = ctx
            .execute_without_session(|ctx| ctx.pcr_read(list))
            .map_err(|e| Error::tpm("PCR read", e))?;
        let mut digests = digests.value().iter();
        let mut got = 0usize;
        for bank in read_sel.get_selections() {
            let alg = hash_alg(bank.hashing_algorithm()).ok_or_else(|| {
                Error::tpm("PCR read", "TPM answered for a bank that was not asked for")
            })?;
            for s in bank.selected() {
                let idx = index(s);
                let digest = digests
                    .next()
                    .ok_or_else(|| Error::tpm("PCR read", "fewer digests than PCRs selected"))?;
                let asked = remaining.get_mut(&alg).is_some_and(|set| set.remove(&idx));
                if !asked {
                    return Err(Error::tpm(
                        "PCR read",
                        format!("TPM answered {alg} PCR {idx}, which was not asked for"),
                    ));
                }
                values
                    .entry(alg)
                    .or_default()
                    .insert(idx, digest.value().to_vec());
                got += 1;
            }
        }
        if got == 0 {
            let banks: Vec<&str> = remaining.keys().map(|a| a.name()).collect();
            return Err(Error::tpm(
                "PCR read",
                format!(
                    "the TPM returned no value for bank(s) {}; is the bank allocated?",
                    banks.join(", ")
                ),
            ));
        }
        remaining.retain(|_, set| !set.is_empty());
    }
    Err(Error::tpm(
        "PCR read",
        "the TPM kept returning partial answers",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(HashAlg, &[u8])]) -> PcrSelectionMap {
        entries.iter().map(|(a, p)| (*a, p.to_vec())).collect()
    }

    #[test]
    fn selection_is_checked() {
        let sel = checked_selection(&map(&[(HashAlg::Sha256, &[3, 0, 10, 3])])).unwrap();
        assert_eq!(
            sel[&HashAlg::Sha256].iter().copied().collect::<Vec<_>>(),
            vec![0, 3, 10]
        );
        assert!(checked_selection(&map(&[(HashAlg::Sha256, &[24])])).is_err());
        assert!(checked_selection(&map(&[(HashAlg::Sha256, &[])])).is_err());
        assert!(checked_selection(&PcrSelectionMap::new()).is_err());
    }

    #[test]
    fn selection_list_keeps_bank_order_and_indices() {
        let sel = checked_selection(&map(&[
            (HashAlg::Sha256, &[0, 7, 23]),
            (HashAlg::Sha1, &[1]),
        ]))
        .unwrap();
        let list = selection_list(&sel).unwrap();
        let banks: Vec<(HashingAlgorithm, Vec<u8>)> = list
            .get_selections()
            .iter()
            .map(|s| {
                (
                    s.hashing_algorithm(),
                    s.selected().into_iter().map(index).collect(),
                )
            })
            .collect();
        assert_eq!(
            banks,
            vec![
                (HashingAlgorithm::Sha1, vec![1]),
                (HashingAlgorithm::Sha256, vec![0, 7, 23]),
            ]
        );
    }
}
