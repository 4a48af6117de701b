//! Every JSON request body the server accepts (proto::wire and
//! proto::policy request types), followed by the normalization and
//! validation the handlers run on them, and keylime TPM policies imported
//! as whitelist parts. The first byte picks the type, the rest is the JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::policy::{self, GoldenImport, GroupSpec, Membership, WhitelistSpec};
use proto::wire::{
    self, ActivateRequest, EnrollRequest, Evidence, RegisterHost, TrustQuery, Whitelist,
};
use proto::HashAlg;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 11 {
        0 => {
            let _ = serde_json::from_slice::<EnrollRequest>(rest);
        }
        1 => {
            let _ = serde_json::from_slice::<ActivateRequest>(rest);
        }
        2 => {
            let _ = serde_json::from_slice::<Evidence>(rest);
        }
        3 => {
            if let Ok(r) = serde_json::from_slice::<RegisterHost>(rest) {
                let _ = wire::valid_host_name(&r.host);
            }
        }
        4 => {
            if let Ok(q) = serde_json::from_slice::<TrustQuery>(rest) {
                for h in &q.hosts {
                    let _ = wire::valid_host_name(h);
                }
            }
        }
        5 => {
            let _ = serde_json::from_slice::<Whitelist>(rest);
        }
        6 => {
            if let Ok(mut spec) = serde_json::from_slice::<WhitelistSpec>(rest) {
                if policy::normalize_spec(&mut spec).is_ok() {
                    // Normalizing is idempotent, and a spec diffs to nothing
                    // against itself.
                    let mut twice = spec.clone();
                    assert!(policy::normalize_spec(&mut twice).is_ok());
                    assert_eq!(twice, spec, "normalize_spec is not idempotent");
                    assert!(policy::diff(&spec.parts, &spec.parts).is_empty());
                }
            }
        }
        7 => {
            if let Ok(g) = serde_json::from_slice::<GroupSpec>(rest) {
                let _ = policy::validate_group(&g);
            }
        }
        8 => {
            if let Ok(m) = serde_json::from_slice::<Membership>(rest) {
                for h in m.add.iter().chain(&m.remove) {
                    let _ = wire::valid_host_name(h);
                }
            }
        }
        9 => {
            if let Ok(g) = serde_json::from_slice::<GoldenImport>(rest) {
                let _ = policy::valid_name(&g.part);
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                for bank in [HashAlg::Sha1, HashAlg::Sha256] {
                    let _ = policy::part_from_keylime_tpm_policy(text, bank);
                }
            }
        }
    }
});
