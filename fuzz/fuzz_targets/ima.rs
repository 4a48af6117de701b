//! IMA measurement lists (ascii and binary) as agents send them, verified
//! against a small keylime runtime policy; and the runtime policy formats
//! operators upload (our JSON, keylime's JSON, plain allowlists). The first
//! byte picks the parser, the rest is its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::ima::{self, ImaState};
use proto::runtime_policy::RuntimePolicy;
use proto::HashAlg;
use std::sync::OnceLock;

static POLICY_JSON: &[u8] = include_bytes!("../../fixtures/ima/keylime-policy-sha256");

fn policy() -> Option<&'static RuntimePolicy> {
    static POLICY: OnceLock<Option<RuntimePolicy>> = OnceLock::new();
    POLICY
        .get_or_init(|| RuntimePolicy::from_keylime_json(POLICY_JSON).ok())
        .as_ref()
}

const BANKS: [HashAlg; 2] = [HashAlg::Sha1, HashAlg::Sha256];

/// The entries without their positions (`line`: ascii line or binary
/// offset), which re-encoding legitimately changes (blank lines dropped).
fn unplaced(entries: &[ima::ImaEntry]) -> Vec<ima::ImaEntry> {
    entries
        .iter()
        .cloned()
        .map(|mut e| {
            e.line = 0;
            e
        })
        .collect()
}

fn check_entries(entries: &[ima::ImaEntry]) {
    for e in entries {
        let _ = (e.name(), e.digest(), e.is_violation());
        let _ = e.template_hash_for(HashAlg::Sha256);
    }
    let _ = ima::replay(entries, HashAlg::Sha256);
    if let Some(p) = policy() {
        let state = ImaState::new(None, None, &BANKS);
        let _ = ima::verify(entries, p, &state, HashAlg::Sha256);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            if let Ok(entries) = ima::parse_ascii(rest) {
                check_entries(&entries);
                // What we print we must read back the same (but for positions).
                let text = ima::encode_ascii(&entries);
                let again = ima::parse_ascii(text.as_bytes()).map(|a| unplaced(&a));
                assert_eq!(again.ok(), Some(unplaced(&entries)), "ascii round trip");
            }
        }
        1 => {
            if let Ok(entries) = ima::parse_binary(rest) {
                check_entries(&entries);
                let again = ima::parse_binary(&ima::encode_binary(&entries)).map(|a| unplaced(&a));
                assert_eq!(again.ok(), Some(unplaced(&entries)), "binary round trip");
            }
        }
        2 => {
            if let Some(p) = policy() {
                let state = ImaState::new(None, None, &BANKS);
                let one = ima::verify_ascii(rest, 0, p, &state, HashAlg::Sha256);
                // The parallel path cuts the list into pieces (here a few
                // lines each) verified on two threads: it must give exactly
                // the one-thread answer, errors and failures included.
                let two = ima::verify_ascii_on_threads(rest, 0, p, &state, HashAlg::Sha256, 2);
                assert_eq!(one, two, "parallel and sequential verification differ");
                // The server's two steps (replay to the quote, then judge),
                // in pieces on two threads, quoted where the list ends:
                // the same outcome, or the same parse error. They recompute
                // a logged template hash only in a quoted bank, so a list
                // logging SHA-384 or SHA-512 template hashes is left out.
                let logged_in_banks = ima::parse_ascii(rest).map_or(true, |es| {
                    es.iter().all(|e| {
                        BANKS
                            .iter()
                            .any(|b| b.digest_len() == e.view().template_hash().len())
                    })
                });
                if !logged_in_banks {
                    return;
                }
                let quoted: Vec<(HashAlg, Vec<u8>)> = match &one {
                    Ok(o) => o
                        .new_state
                        .banks
                        .iter()
                        .map(|b| (b.bank, b.pcr10.clone()))
                        .collect(),
                    Err(_) => vec![(HashAlg::Sha256, vec![0; 32])],
                };
                let quoted: Vec<(HashAlg, &[u8])> =
                    quoted.iter().map(|(b, v)| (*b, v.as_slice())).collect();
                let replayed = ima::replay_ascii_pieces(rest, 0, &state, &quoted, 2, 64);
                match (&one, replayed) {
                    (Ok(o), Ok(r)) => {
                        let judged = ima::judge_replayed_on(&r, p, 2, 3);
                        assert_eq!(judged.as_ref().ok(), Some(o), "server steps differ");
                    }
                    (Err(e), Err(ima::ReplayFailure::Parse(f))) => assert_eq!(e, &f),
                    (one, replayed) => panic!("verify_ascii {one:?}, server steps {replayed:?}"),
                }
            }
        }
        3 => {
            if let Ok(p) = RuntimePolicy::from_json(rest) {
                let _ = p.validate();
            }
        }
        4 => {
            if let Ok(p) = RuntimePolicy::from_keylime_json(rest) {
                let _ = p.validate();
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(p) = RuntimePolicy::from_allowlist(text) {
                    let _ = p.validate();
                }
            }
        }
    }
});
