//! TPM structures the server decodes from agents: TPMS_ATTEST (quotes),
//! TPMT_SIGNATURE, TPM2B_PUBLIC / TPMT_PUBLIC (EK and AK) and
//! TPML_PCR_SELECTION. The first byte picks the decoder, the rest is the
//! structure. A successful decode must re-encode to something that decodes
//! to the same value (what the server stores is what it verified).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::tpm::{Attest, PcrSelection, Public, Signature};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(a) = Attest::decode(rest) {
                let again = Attest::decode(&a.encode());
                assert_eq!(again.as_ref(), Ok(&a), "TPMS_ATTEST round trip");
            }
        }
        1 => {
            if let Ok(s) = Signature::decode(rest) {
                let _ = (s.hash(), s.scheme_name());
                let again = Signature::decode(&s.encode());
                assert_eq!(again.as_ref(), Ok(&s), "TPMT_SIGNATURE round trip");
            }
        }
        2 => {
            if let Ok(p) = Public::decode(rest) {
                let _ = p.name();
                let again = Public::decode(&p.encode());
                assert_eq!(again.as_ref(), Ok(&p), "TPM2B_PUBLIC round trip");
            }
        }
        3 => {
            if let Ok(p) = Public::decode_tpmt(rest) {
                let _ = p.name();
            }
        }
        _ => {
            if let Ok(s) = PcrSelection::decode(rest) {
                let _ = s.normalized();
                let again = PcrSelection::decode(&s.encode());
                assert_eq!(again.as_ref(), Ok(&s), "TPML_PCR_SELECTION round trip");
            }
        }
    }
});
