//! EK certificates as agents send them (DER from the TPM's NV index):
//! verified against a fixed trust anchor (fuzz/data/ek-root.der, which
//! signed the seed certificate) and against an empty root set; and the
//! same bytes loaded as an operator-supplied CA certificate. The first
//! byte picks the mode, the rest is the certificate.
#![no_main]

use attestation_server::ekcert::{verify_ek_certificate, EkRoots};
use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use proto::tpm::Public;
use std::sync::OnceLock;

static ROOT_DER: &[u8] = include_bytes!("../data/ek-root.der");
static EK_PUBLIC: &[u8] = include_bytes!("../../fixtures/credential/test-ek.pub");

struct Fixed {
    roots: EkRoots,
    empty: EkRoots,
    ek: Public,
}

fn fixed() -> Option<&'static Fixed> {
    static FIXED: OnceLock<Option<Fixed>> = OnceLock::new();
    FIXED
        .get_or_init(|| {
            Some(Fixed {
                roots: EkRoots::from_der([ROOT_DER.to_vec()]).ok()?,
                empty: EkRoots::default(),
                ek: Public::decode(EK_PUBLIC).ok()?,
            })
        })
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Some(f) = fixed() else {
        return;
    };
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    // Inside the seed certificate's validity.
    let Some(now) = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).single() else {
        return;
    };
    match which % 3 {
        0 => {
            let _ = verify_ek_certificate(rest, &f.ek, &f.roots, now);
        }
        1 => {
            let _ = verify_ek_certificate(rest, &f.ek, &f.empty, now);
        }
        _ => {
            if let Ok(roots) = EkRoots::from_der([rest.to_vec()]) {
                let _ = (roots.root_count(), roots.intermediate_count());
                let _ = verify_ek_certificate(rest, &f.ek, &roots, now);
            }
        }
    }
});
