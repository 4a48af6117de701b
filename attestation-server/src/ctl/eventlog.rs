//! `attestctl eventlog replay FILE` and `attestctl policy from-eventlog FILE`:
//! local verbs on a UEFI event log (`binary_bios_measurements`), no server.

use super::CtlError;
use proto::bootpolicy::BootPolicy;
use proto::eventlog::{self, EventLog};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Subcommand)]
pub enum EventlogCommand {
    /// Replay a TCG UEFI event log; print, per bank and PCR, the value it
    /// replays to, and the event count.
    Replay { file: PathBuf },
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Generate a boot reference policy from a known-good host's UEFI event
    /// log (prints it, or writes it to --out).
    FromEventlog {
        file: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn read_log(file: &Path) -> Result<EventLog, CtlError> {
    let input = |detail: String| CtlError::Input {
        path: file.display().to_string(),
        detail,
    };
    let bytes = std::fs::read(file).map_err(|e| input(e.to_string()))?;
    eventlog::parse(&bytes).map_err(|e| input(format!("{}: {e}", e.code())))
}

/// The replay as JSON: `{"events": N, "banks": {"sha256": {"0": "hex"}}}`.
pub fn replay_json(log: &EventLog) -> Value {
    let banks: Map<String, Value> = log
        .replay()
        .into_iter()
        .map(|(bank, pcrs)| {
            let pcrs: Map<String, Value> = pcrs
                .into_iter()
                .map(|(i, v)| (i.to_string(), Value::String(hex::encode(v))))
                .collect();
            (bank.name().to_string(), Value::Object(pcrs))
        })
        .collect();
    json!({
        "events": log.events.len(),
        "startup_locality": log.startup_locality(),
        "banks": banks,
    })
}

pub fn run_eventlog(cmd: &EventlogCommand) -> Result<Value, CtlError> {
    match cmd {
        EventlogCommand::Replay { file } => Ok(replay_json(&read_log(file)?)),
    }
}

pub fn run_policy(cmd: &PolicyCommand) -> Result<Value, CtlError> {
    match cmd {
        PolicyCommand::FromEventlog { file, out } => {
            let log = read_log(file)?;
            let policy = BootPolicy::from_eventlog(&log);
            // A golden policy must describe what the TPM measured. An event
            // whose data does not hash to its digest (or does not parse)
            // is left out of the policy, so the policy refuses its own log:
            // say so instead of writing a policy no host can pass.
            if let Some(fault) = policy.evaluate(&log).first() {
                return Err(CtlError::Input {
                    path: file.display().to_string(),
                    detail: format!(
                        "boot_policy_from_untrusted_log: {fault}; the log's event data is not what its digests cover, so no policy is generated from it"
                    ),
                });
            }
            let value = serde_json::to_value(&policy).map_err(|e| CtlError::Input {
                path: file.display().to_string(),
                detail: e.to_string(),
            })?;
            let Some(out) = out else { return Ok(value) };
            let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
            text.push('\n');
            std::fs::write(out, text).map_err(|e| CtlError::Input {
                path: out.display().to_string(),
                detail: format!("cannot write: {e}"),
            })?;
            Ok(json!({
                "written": out.display().to_string(),
                "events": log.events.len(),
                "bank": policy.bank,
                "secure_boot": policy.secure_boot,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/eventlog")
            .join(name)
    }

    #[test]
    fn replay_prints_every_bank_and_pcr() {
        let v = run_eventlog(&EventlogCommand::Replay {
            file: fixture("create-mb-policy.bin"),
        })
        .unwrap();
        assert_eq!(v["events"], 120);
        assert_eq!(v["startup_locality"], 3);
        // PCR 7 agrees with the tpm2_eventlog oracle (PCR 0 does not: see
        // docs/eventlog.md).
        let oracle: Value =
            serde_json::from_slice(&std::fs::read(fixture("create-mb-policy.pcrs.json")).unwrap())
                .unwrap();
        for bank in ["sha1", "sha256"] {
            assert_eq!(v["banks"][bank]["7"], oracle["pcrs"][bank]["7"]);
            assert_eq!(
                v["banks"][bank].as_object().unwrap().len(),
                oracle["pcrs"][bank].as_object().unwrap().len()
            );
        }
    }

    #[test]
    fn policy_written_to_file_reads_back_and_passes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("boot.json");
        let file = fixture("create-mb-policy-secureboot.bin");
        let v = run_policy(&PolicyCommand::FromEventlog {
            file: file.clone(),
            out: Some(out.clone()),
        })
        .unwrap();
        assert_eq!(v["secure_boot"], true);
        let policy: BootPolicy =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let log = read_log(&file).unwrap();
        assert!(policy.evaluate(&log).is_empty());
        let printed = run_policy(&PolicyCommand::FromEventlog { file, out: None }).unwrap();
        assert_eq!(
            serde_json::from_value::<BootPolicy>(printed).unwrap(),
            policy
        );
    }

    #[test]
    fn no_policy_from_a_log_whose_data_is_not_what_was_measured() {
        // The last byte of the dbx variable's data changed, its digest kept:
        // a forged revocation list the TPM never measured.
        let file = fixture("create-mb-policy-secureboot.bin");
        let mut bytes = std::fs::read(&file).unwrap();
        let log = proto::eventlog::parse(&bytes).unwrap();
        let dbx = log
            .events
            .iter()
            .find(|e| proto::eventlog::parse_uefi_variable(e).is_ok_and(|v| v.name == "dbx"))
            .expect("the fixture measures dbx");
        let (index, last) = (dbx.index, dbx.data_offset + dbx.data.len() - 1);
        bytes[last] ^= 0x01;
        let dir = tempfile::tempdir().unwrap();
        let forged = dir.path().join("forged.bin");
        std::fs::write(&forged, &bytes).unwrap();
        let out = dir.path().join("boot.json");
        let e = run_policy(&PolicyCommand::FromEventlog {
            file: forged,
            out: Some(out.clone()),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("boot_policy_from_untrusted_log"), "{e}");
        assert!(e.contains("event_data_digest_mismatch"), "{e}");
        assert!(e.contains(&format!("at event {index} ")), "{e}");
        assert!(!out.exists(), "nothing written");
    }

    #[test]
    fn bad_logs_name_the_error_code() {
        for (name, code) in [
            ("create-mb-policy-bogus.bin", "eventlog_bad_header"),
            ("create-mb-policy-empty.bin", "eventlog_empty"),
        ] {
            let e = run_eventlog(&EventlogCommand::Replay {
                file: fixture(name),
            })
            .unwrap_err();
            assert!(e.to_string().contains(code), "{e}");
        }
    }
}
