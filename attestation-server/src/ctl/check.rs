//! `attestctl check`: a Nagios/Icinga plugin. It prints one line,
//! `ATTESTATION STATE - text | perfdata`, and exits 0 (OK), 1 (WARNING),
//! 2 (CRITICAL) or 3 (UNKNOWN: the server could not be asked), as the
//! monitoring plugin guidelines require.

use super::CtlConfig;
use crate::metrics::PoolStatus;
use std::fmt::Write;
use std::path::Path;

/// Thresholds; a value above a threshold raises the state (plugin
/// guidelines: a bare `N` alerts outside `0..=N`).
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// WARNING when more than N hosts are untrusted.
    #[arg(long, default_value_t = 0)]
    pub warning_untrusted: u64,
    /// CRITICAL when more than N hosts are untrusted.
    #[arg(long)]
    pub critical_untrusted: Option<u64>,
    /// WARNING when any audit sink has more than N undelivered events.
    #[arg(long, default_value_t = 1000)]
    pub max_backlog: u64,
}

/// The plugin states, with their exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl State {
    pub fn label(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }

    pub fn exit_code(self) -> u8 {
        self as u8
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub state: State,
    pub line: String,
}

/// Judge a pool status against the thresholds.
pub fn evaluate(status: &PoolStatus, args: &CheckArgs) -> Report {
    let h = status.hosts;
    let untrusted = u64::try_from(h.untrusted).unwrap_or(0);
    let backlog = status.max_backlog();
    let mut state = State::Ok;
    let mut problems = Vec::new();
    if args.critical_untrusted.is_some_and(|c| untrusted > c) {
        state = State::Critical;
        problems.push(format!("{untrusted} untrusted hosts"));
    } else if untrusted > args.warning_untrusted {
        state = State::Warning;
        problems.push(format!("{untrusted} untrusted hosts"));
    }
    if u64::try_from(backlog).unwrap_or(0) > args.max_backlog {
        state = state.max(State::Warning);
        let worst = status
            .audit
            .iter()
            .max_by_key(|s| s.backlog)
            .map_or("?", |s| s.sink.as_str());
        problems.push(format!(
            "audit sink {worst} has {backlog} undelivered events (max {})",
            args.max_backlog
        ));
    }
    let mut text = format!(
        "{} trusted, {} untrusted, {} unknown hosts on {}",
        h.trusted, h.untrusted, h.unknown, status.server
    );
    if !problems.is_empty() {
        text = format!("{}; {text}", problems.join("; "));
    }
    let crit = args
        .critical_untrusted
        .map(|c| c.to_string())
        .unwrap_or_default();
    let mut line = format!("ATTESTATION {} - {text} | ", state.label());
    let _ = write!(
        line,
        "trusted={};;;0 untrusted={};{};{crit};0 unknown={};;;0 backlog={backlog};{};;0",
        h.trusted, h.untrusted, args.warning_untrusted, h.unknown, args.max_backlog
    );
    Report { state, line }
}

/// The UNKNOWN report: the check could not be made.
pub fn unknown(why: impl std::fmt::Display) -> Report {
    // Perfdata must stay one line: a multi-line error would break parsers.
    let why = why.to_string().replace(['\n', '|'], " ");
    Report {
        state: State::Unknown,
        line: format!("ATTESTATION UNKNOWN - {why}"),
    }
}

/// Ask the server named in `config` (admin.toml) and judge its answer.
/// Every failure becomes UNKNOWN: a monitor must not read "server down"
/// as "pool healthy" or as "pool compromised".
pub async fn run(config: Option<&Path>, args: &CheckArgs) -> Report {
    let Some(path) = config else {
        return unknown("--config is required (the admin.toml written by attestctl init)");
    };
    let api = match CtlConfig::load(path).and_then(|c| c.client()) {
        Ok(api) => api,
        Err(e) => return unknown(e),
    };
    match api.get::<PoolStatus>("/v1/status").await {
        Ok(status) => evaluate(&status, args),
        Err(e) => unknown(format!("cannot read the pool status: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::SinkBacklog;
    use crate::store::TrustCounts;

    fn status(trusted: i64, untrusted: i64, backlog: i64) -> PoolStatus {
        PoolStatus {
            server: "as1".into(),
            hosts: TrustCounts {
                trusted,
                untrusted,
                unknown: 1,
            },
            audit: vec![SinkBacklog {
                sink: "file".into(),
                backlog,
                lag_secs: 0.0,
            }],
        }
    }

    fn args(warn: u64, crit: Option<u64>, max_backlog: u64) -> CheckArgs {
        CheckArgs {
            warning_untrusted: warn,
            critical_untrusted: crit,
            max_backlog,
        }
    }

    #[test]
    fn thresholds_choose_the_state() {
        let ok = evaluate(&status(3, 0, 0), &args(0, Some(2), 10));
        assert_eq!(ok.state, State::Ok);
        assert_eq!(
            ok.line,
            "ATTESTATION OK - 3 trusted, 0 untrusted, 1 unknown hosts on as1 \
             | trusted=3;;;0 untrusted=0;0;2;0 unknown=1;;;0 backlog=0;10;;0"
        );
        assert_eq!(
            evaluate(&status(3, 1, 0), &args(0, Some(2), 10)).state,
            State::Warning
        );
        let crit = evaluate(&status(3, 3, 0), &args(0, Some(2), 10));
        assert_eq!(crit.state, State::Critical);
        assert!(crit
            .line
            .starts_with("ATTESTATION CRITICAL - 3 untrusted hosts;"));
        // Exactly at the threshold is still fine.
        assert_eq!(
            evaluate(&status(3, 2, 0), &args(2, Some(5), 10)).state,
            State::Ok
        );
        let lagging = evaluate(&status(3, 0, 11), &args(0, None, 10));
        assert_eq!(lagging.state, State::Warning);
        assert!(lagging.line.contains("audit sink file has 11 undelivered"));
        // The backlog does not lower a critical state.
        assert_eq!(
            evaluate(&status(0, 9, 11), &args(0, Some(2), 10)).state,
            State::Critical
        );
    }

    #[test]
    fn unknown_is_one_line_with_exit_code_3() {
        let r = unknown("connection refused\nat 127.0.0.1 | x");
        assert_eq!(r.state.exit_code(), 3);
        assert_eq!(
            r.line,
            "ATTESTATION UNKNOWN - connection refused at 127.0.0.1   x"
        );
    }
}
