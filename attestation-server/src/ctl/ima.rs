//! `attestctl ima verify`: check an IMA measurement list against a runtime
//! policy offline. Prints JSON (entries checked, failures with line numbers,
//! the replayed PCR 10); exits 1 when an entry fails or PCR 10 differs.

use super::CtlError;
use clap::{Subcommand, ValueEnum};
use proto::ima::{self, ImaEntry, ImaState};
use proto::runtime_policy::RuntimePolicy;
use proto::HashAlg;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum ImaCommand {
    /// Verify a measurement list (ascii or binary) against a runtime policy
    /// (ours, Keylime's JSON or a flat allowlist); exits 1 on any failure.
    Verify(VerifyArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The runtime policy: our JSON, Keylime runtime-policy JSON, or a flat
    /// `digest  path` allowlist (detected from the content).
    #[arg(long)]
    pub policy: PathBuf,
    /// The measurement list: ascii_runtime_measurements or
    /// binary_runtime_measurements (detected from the first byte).
    #[arg(long)]
    pub log: PathBuf,
    /// The quoted PCR 10 (hex) to compare the replay with.
    #[arg(long)]
    pub pcr10: Option<String>,
    /// The PCR bank to replay.
    #[arg(long, value_enum, default_value_t = Bank::Sha1)]
    pub bank: Bank,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bank {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl From<Bank> for HashAlg {
    fn from(b: Bank) -> Self {
        match b {
            Bank::Sha1 => HashAlg::Sha1,
            Bank::Sha256 => HashAlg::Sha256,
            Bank::Sha384 => HashAlg::Sha384,
            Bank::Sha512 => HashAlg::Sha512,
        }
    }
}

fn input_error(path: &Path, detail: String) -> CtlError {
    CtlError::Input {
        path: path.display().to_string(),
        detail,
    }
}

/// The runtime policy in `path` (ours, Keylime's runtime-policy JSON or a
/// flat allowlist, detected from the content), validated, and its format.
pub(crate) fn load_policy(path: &Path) -> Result<(&'static str, RuntimePolicy), CtlError> {
    let bytes = std::fs::read(path).map_err(|e| input_error(path, e.to_string()))?;
    let err =
        |e: proto::runtime_policy::PolicyError| input_error(path, format!("{}: {e}", e.code()));
    let policy = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) if m.contains_key("meta") || m.contains_key("verification-keys") => (
            "keylime",
            RuntimePolicy::from_keylime_json(&bytes).map_err(err)?,
        ),
        Ok(_) => ("json", RuntimePolicy::from_json(&bytes).map_err(err)?),
        Err(_) => {
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                input_error(path, format!("neither JSON nor a text allowlist: {e}"))
            })?;
            (
                "allowlist",
                RuntimePolicy::from_allowlist(text).map_err(err)?,
            )
        }
    };
    policy.1.validate().map_err(err)?;
    Ok(policy)
}

/// A measurement list as read: ascii text is verified as it is parsed.
enum Log {
    Ascii(Vec<u8>),
    Binary(Vec<ImaEntry>),
}

fn log_error(path: &Path) -> impl Fn(ima::ImaError) -> CtlError + '_ {
    move |e| input_error(path, format!("{}: {e}", e.code()))
}

fn load_log(path: &Path) -> Result<(&'static str, Log), CtlError> {
    let bytes = std::fs::read(path).map_err(|e| input_error(path, e.to_string()))?;
    // A binary list starts with a little-endian u32 PCR index (NUL bytes);
    // anything starting with text is read, and judged, as ascii.
    let head = bytes.get(..bytes.len().min(4)).unwrap_or_default();
    if head.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        Ok(("ascii", Log::Ascii(bytes)))
    } else {
        let entries = ima::parse_binary(&bytes).map_err(log_error(path))?;
        Ok(("binary", Log::Binary(entries)))
    }
}

/// Verify and build the JSON report; `true` when everything passed.
pub fn verify_report(args: &VerifyArgs) -> Result<(Value, bool), CtlError> {
    let (policy_format, policy) = load_policy(&args.policy)?;
    let (log_format, log) = load_log(&args.log)?;
    let bank = HashAlg::from(args.bank);
    let quoted = match &args.pcr10 {
        Some(h) => {
            let v = hex::decode(h.trim())
                .map_err(|e| input_error(Path::new("--pcr10"), e.to_string()))?;
            if v.len() != bank.digest_len() {
                return Err(input_error(
                    Path::new("--pcr10"),
                    format!("{} bytes, a {bank} PCR has {}", v.len(), bank.digest_len()),
                ));
            }
            Some(v)
        }
        None => None,
    };
    let start = ImaState::new(None, None, &[bank]);
    let out = match &log {
        // Parsed and judged in one pass, a long list on every core.
        Log::Ascii(text) => ima::verify_ascii_parallel(text, 1, &policy, &start, bank, 0)
            .map_err(log_error(&args.log))?,
        Log::Binary(entries) => ima::verify(entries, &policy, &start, bank)
            .map_err(|e| input_error(&args.policy, format!("{}: {e}", e.code())))?,
    };
    let replayed = hex::encode(out.new_state.pcr10(bank).unwrap_or_default());
    let pcr_check = quoted
        .as_ref()
        .map(|q| out.new_state.matches_quote(bank, q));
    let ok = out.ok() && pcr_check.as_ref().is_none_or(Result::is_ok);
    let mut report = json!({
        "ok": ok,
        "log": args.log.display().to_string(),
        "log_format": log_format,
        "policy_format": policy_format,
        "bank": bank.name(),
        "entries_checked": out.entries_checked,
        "pcr10_replayed": replayed,
        "failures_total": out.failures_total,
        "failures": out.failures,
    });
    if let Some(check) = pcr_check {
        report["pcr10_quoted"] = json!(args.pcr10.as_deref().map(str::trim));
        report["pcr10_match"] = json!(check.is_ok());
    }
    Ok((report, ok))
}

/// Run the verb. A failed verification prints its report and exits 1 here,
/// since the caller treats an `Ok` answer as success.
pub fn run(cmd: &ImaCommand) -> Result<Value, CtlError> {
    match cmd {
        ImaCommand::Verify(args) => {
            let (report, ok) = verify_report(args)?;
            if ok {
                return Ok(report);
            }
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            let _ = writeln!(std::io::stdout(), "{text}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/ima")
            .join(name)
    }

    fn args(policy: PathBuf, log: PathBuf, pcr10: Option<String>, bank: Bank) -> VerifyArgs {
        VerifyArgs {
            policy,
            log,
            pcr10,
            bank,
        }
    }

    #[test]
    fn keylime_fixture_reports_first_failure_with_line() {
        let (v, ok) = verify_report(&args(
            fixture("keylime-policy-sha256"),
            fixture("keylime-ima-log-sha256"),
            None,
            Bank::Sha256,
        ))
        .unwrap();
        assert!(!ok);
        assert_eq!(v["policy_format"], "keylime");
        assert_eq!(v["entries_checked"], 2);
        let data = v["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == "/data")
            .unwrap();
        assert_eq!(data["line"], 2);
        assert_eq!(data["code"], "not_in_policy");
    }

    #[test]
    fn passing_list_with_quote_and_binary_format() {
        let dir = tempfile::tempdir().unwrap();
        let entries = ima::parse_ascii(
            &std::fs::read(fixture("rust-keylime-ascii_runtime_measurements")).unwrap(),
        )
        .unwrap();
        // A flat allowlist of exactly what the list carries.
        let mut allow = String::new();
        for e in &entries {
            allow.push_str(&format!("{}  {}\n", hex::encode(e.digest()), e.name()));
        }
        let policy = dir.path().join("allow.txt");
        std::fs::write(&policy, allow).unwrap();
        let bin = dir.path().join("binary_runtime_measurements");
        std::fs::write(&bin, ima::encode_binary(&entries)).unwrap();
        let pcr = hex::encode(ima::replay(&entries, HashAlg::Sha1));
        let (v, ok) = verify_report(&args(
            policy.clone(),
            bin.clone(),
            Some(pcr.clone()),
            Bank::Sha1,
        ))
        .unwrap();
        assert!(ok, "{v}");
        assert_eq!(v["log_format"], "binary");
        assert_eq!(v["policy_format"], "allowlist");
        assert_eq!(v["entries_checked"], 826);
        assert_eq!(v["pcr10_replayed"], pcr);
        assert_eq!(v["pcr10_match"], true);
        // The ascii list (judged as it is parsed) says the same.
        let (a, ok) = verify_report(&args(
            policy.clone(),
            fixture("rust-keylime-ascii_runtime_measurements"),
            Some(pcr.clone()),
            Bank::Sha1,
        ))
        .unwrap();
        assert!(ok, "{a}");
        assert_eq!(a["log_format"], "ascii");
        for key in [
            "entries_checked",
            "pcr10_replayed",
            "pcr10_match",
            "failures",
        ] {
            assert_eq!(a[key], v[key], "{key}");
        }
        // A wrong quote fails.
        let wrong = "00".repeat(20);
        let (v, ok) = verify_report(&args(policy, bin, Some(wrong), Bank::Sha1)).unwrap();
        assert!(!ok);
        assert_eq!(v["pcr10_match"], false);
    }

    #[test]
    fn bad_inputs_are_errors_with_positions() {
        let e = verify_report(&args(
            fixture("keylime-policy-sha1"),
            fixture("rust-keylime-invalid_ima_log.txt"),
            None,
            Bank::Sha1,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.json");
        std::fs::write(&p, br#"{"excludes": ["(unclosed"]}"#).unwrap();
        let e =
            verify_report(&args(p, fixture("keylime-ima-log-sha1"), None, Bank::Sha1)).unwrap_err();
        assert!(e.to_string().contains("policy_invalid_regex"), "{e}");
    }
}
