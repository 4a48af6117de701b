//! UEFI (TCG2 crypto-agile) event logs as agents send them: parse, replay,
//! check against a quote, decode the UEFI variable / signature list /
//! image-load events, and judge the log with a boot policy generated from a
//! real log (fixtures/eventlog/mb_log.bin) and with one generated from the
//! input itself (which must then accept it, but for faults of the log's
//! own integrity).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::bootpolicy::{BootFaultCode, BootPolicy};
use proto::eventlog::{self, EventLog};
use proto::HashAlg;
use std::collections::BTreeMap;
use std::sync::OnceLock;

static REFERENCE_LOG: &[u8] = include_bytes!("../../fixtures/eventlog/mb_log.bin");

fn reference_policy() -> Option<&'static BootPolicy> {
    static POLICY: OnceLock<Option<BootPolicy>> = OnceLock::new();
    POLICY
        .get_or_init(|| {
            eventlog::parse(REFERENCE_LOG)
                .ok()
                .map(|log| BootPolicy::from_eventlog(&log))
        })
        .as_ref()
}

fn exercise(log: &EventLog) {
    let _ = log.banks();
    let _ = log.startup_locality();
    let replayed = log.replay();
    let _ = log.replay_tracked();
    // A quote holding exactly what the log replays to must match it.
    for bank in log.banks() {
        let tracked = log.replay_tracked();
        let quoted: BTreeMap<u32, Vec<u8>> = tracked
            .get(&bank)
            .map(|pcrs| pcrs.iter().map(|(k, (v, _))| (*k, v.clone())).collect())
            .unwrap_or_default();
        assert!(
            eventlog::check_against_quote(log, bank, &quoted).is_ok(),
            "log does not match its own replay in {bank}"
        );
    }
    let _ = eventlog::check_against_quote(log, HashAlg::Sha256, &BTreeMap::new());
    drop(replayed);
    for event in &log.events {
        let _ = event.type_name();
        let _ = eventlog::image_load_path(event);
        let _ = eventlog::event_text(event);
        if let Ok(var) = eventlog::parse_uefi_variable(event) {
            let _ = eventlog::parse_signature_lists(event, &var.data);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(log) = eventlog::parse(data) else {
        return;
    };
    exercise(&log);
    if let Some(policy) = reference_policy() {
        let _ = policy.evaluate(&log);
    }
    let own = BootPolicy::from_eventlog(&log);
    if own.validate().is_ok() {
        // Event data that its digest does not cover (or that does not
        // parse) is a fault of the log itself, whatever the policy; a
        // mutated log has such events, a known-good one does not.
        let faults: Vec<_> = own
            .evaluate(&log)
            .into_iter()
            .filter(|f| {
                !matches!(
                    f.code,
                    BootFaultCode::EventDataDigestMismatch | BootFaultCode::EventDataMalformed
                )
            })
            .collect();
        assert!(
            faults.is_empty(),
            "a policy generated from a log refuses it: {faults:?}"
        );
    }
});
