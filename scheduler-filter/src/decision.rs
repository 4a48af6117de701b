//! The pure part: given what is known about each host, which candidates pass.

use chrono::{DateTime, Utc};
use proto::wire::{valid_host_name, HostTrust, Trust};
use serde::Serialize;
use std::collections::HashMap;

/// What the filter learned about one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The server's verdict (fresh from the cache or from the query).
    Verdict(HostTrust),
    /// No verdict could be obtained; the text says why.
    Failed(String),
}

/// The outcome for one candidate, with an explanation for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub host: String,
    pub allowed: bool,
    /// The verdict the decision was based on, if the server gave one.
    pub verdict: Option<HostTrust>,
    pub reason: String,
}

/// The trust a verdict still carries at `now`.
///
/// A trust claim needs an end date in the future. A distrust claim stands
/// until its end date passes (one without an end date stays untrusted), so
/// neither direction is ever widened by missing data.
pub fn effective_trust(verdict: &HostTrust, now: DateTime<Utc>) -> Trust {
    match (verdict.trust, verdict.expires_at) {
        (_, Some(expires)) if expires <= now => Trust::Unknown,
        (Trust::Trusted, None) => Trust::Unknown,
        (trust, _) => trust,
    }
}

/// Decide every candidate, in input order.
///
/// A candidate passes only if its name is valid, `verdicts` holds a verdict
/// for exactly that name, and the verdict's effective trust at `now` equals
/// `required`. Everything else (no entry, a failed lookup, a verdict naming
/// another host) is denied.
pub fn decide_from(
    verdicts: &HashMap<String, Lookup>,
    candidates: &[String],
    required: Trust,
    now: DateTime<Utc>,
) -> Vec<Decision> {
    candidates
        .iter()
        .map(|host| decide_one(verdicts, host, required, now))
        .collect()
}

fn decide_one(
    verdicts: &HashMap<String, Lookup>,
    host: &str,
    required: Trust,
    now: DateTime<Utc>,
) -> Decision {
    let deny = |verdict: Option<HostTrust>, reason: String| Decision {
        host: host.to_string(),
        allowed: false,
        verdict,
        reason,
    };
    if !valid_host_name(host) {
        return deny(
            None,
            "invalid host name; not sent to the trust server".into(),
        );
    }
    let verdict = match verdicts.get(host) {
        None => {
            return deny(
                None,
                "the trust server gave no verdict for this host".into(),
            )
        }
        Some(Lookup::Failed(why)) => return deny(None, why.clone()),
        Some(Lookup::Verdict(v)) => v,
    };
    if verdict.host != host {
        return deny(
            Some(verdict.clone()),
            format!("the verdict names another host ({:?})", verdict.host),
        );
    }
    let trust = effective_trust(verdict, now);
    let reason = explain(verdict, trust, now);
    Decision {
        host: host.to_string(),
        allowed: trust == required,
        verdict: Some(verdict.clone()),
        reason: if trust == required {
            reason
        } else {
            format!("required {}, but {reason}", required.as_str())
        },
    }
}

fn explain(verdict: &HostTrust, trust: Trust, now: DateTime<Utc>) -> String {
    let causes = verdict
        .reasons
        .iter()
        .map(|r| format!("{}: {}", r.code, r.message))
        .collect::<Vec<_>>()
        .join("; ");
    let with_causes = |text: String| {
        if causes.is_empty() {
            text
        } else {
            format!("{text} ({causes})")
        }
    };
    match (trust, verdict.trust, verdict.expires_at) {
        (Trust::Unknown, t, Some(expires)) if expires <= now && t != Trust::Unknown => {
            format!(
                "the {} verdict expired at {}; the host counts as unknown",
                t.as_str(),
                expires.to_rfc3339()
            )
        }
        (Trust::Unknown, Trust::Trusted, None) => {
            "the trusted verdict has no expiry time; the host counts as unknown".into()
        }
        (Trust::Trusted, _, Some(expires)) => {
            format!("host is trusted until {}", expires.to_rfc3339())
        }
        (t, _, _) => with_causes(format!("host is {}", t.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use proto::wire::Reason;

    fn verdict(host: &str, trust: Trust, expires_in: Option<i64>) -> HostTrust {
        let now = Utc::now();
        HostTrust {
            host: host.into(),
            trust,
            verified_at: Some(now),
            expires_at: expires_in.map(|s| now + TimeDelta::seconds(s)),
            reasons: vec![],
            policy: None,
        }
    }

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn map(entries: Vec<(&str, Lookup)>) -> HashMap<String, Lookup> {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn trusted_passes_untrusted_and_unknown_fail() {
        let mut bad = verdict("b", Trust::Untrusted, Some(300));
        bad.reasons.push(Reason {
            step: "whitelist".into(),
            code: "pcr_not_whitelisted".into(),
            message: "PCR 4 differs".into(),
            pcr: None,
        });
        let v = map(vec![
            (
                "a",
                Lookup::Verdict(verdict("a", Trust::Trusted, Some(300))),
            ),
            ("b", Lookup::Verdict(bad)),
            ("c", Lookup::Verdict(verdict("c", Trust::Unknown, None))),
        ]);
        let d = decide_from(&v, &hosts(&["c", "a", "b"]), Trust::Trusted, Utc::now());
        assert_eq!(
            d.iter()
                .map(|d| (d.host.as_str(), d.allowed))
                .collect::<Vec<_>>(),
            vec![("c", false), ("a", true), ("b", false)]
        );
        assert!(d[1].reason.contains("trusted until"), "{}", d[1].reason);
        assert!(
            d[2].reason.contains("pcr_not_whitelisted"),
            "{}",
            d[2].reason
        );
        assert!(d[0].reason.contains("unknown"), "{}", d[0].reason);
        assert_eq!(d[1].verdict.as_ref().map(|v| v.trust), Some(Trust::Trusted));
    }

    #[test]
    fn required_untrusted_lists_only_bad_hosts() {
        let v = map(vec![
            (
                "a",
                Lookup::Verdict(verdict("a", Trust::Trusted, Some(300))),
            ),
            (
                "b",
                Lookup::Verdict(verdict("b", Trust::Untrusted, Some(300))),
            ),
            ("c", Lookup::Verdict(verdict("c", Trust::Untrusted, None))),
            (
                "d",
                Lookup::Verdict(verdict("d", Trust::Untrusted, Some(-1))),
            ),
            ("e", Lookup::Failed("server down".into())),
        ]);
        let d = decide_from(
            &v,
            &hosts(&["a", "b", "c", "d", "e"]),
            Trust::Untrusted,
            Utc::now(),
        );
        let allowed: Vec<_> = d
            .iter()
            .filter(|d| d.allowed)
            .map(|d| d.host.as_str())
            .collect();
        assert_eq!(allowed, vec!["b", "c"]);
    }

    #[test]
    fn expired_or_open_ended_trust_fails() {
        let v = map(vec![
            (
                "old",
                Lookup::Verdict(verdict("old", Trust::Trusted, Some(-5))),
            ),
            (
                "open",
                Lookup::Verdict(verdict("open", Trust::Trusted, None)),
            ),
        ]);
        let d = decide_from(&v, &hosts(&["old", "open"]), Trust::Trusted, Utc::now());
        assert!(d.iter().all(|d| !d.allowed));
        assert!(d[0].reason.contains("expired"), "{}", d[0].reason);
        assert!(d[1].reason.contains("no expiry"), "{}", d[1].reason);

        // The same verdict that passes now fails once `now` reaches expires_at.
        let v = map(vec![(
            "a",
            Lookup::Verdict(verdict("a", Trust::Trusted, Some(60))),
        )]);
        let later = Utc::now() + TimeDelta::seconds(61);
        assert!(decide_from(&v, &hosts(&["a"]), Trust::Trusted, Utc::now())[0].allowed);
        assert!(!decide_from(&v, &hosts(&["a"]), Trust::Trusted, later)[0].allowed);
    }

    #[test]
    fn missing_failed_mismatched_and_invalid_hosts_fail() {
        let v = map(vec![
            ("x", Lookup::Failed("trust server unreachable".into())),
            // Keyed under one name but naming another: never trusted.
            (
                "y",
                Lookup::Verdict(verdict("Y", Trust::Trusted, Some(300))),
            ),
            (
                "../etc",
                Lookup::Verdict(verdict("../etc", Trust::Trusted, Some(300))),
            ),
        ]);
        let d = decide_from(
            &v,
            &hosts(&["missing", "x", "y", "../etc"]),
            Trust::Trusted,
            Utc::now(),
        );
        assert!(d.iter().all(|d| !d.allowed));
        assert!(d[0].reason.contains("no verdict"), "{}", d[0].reason);
        assert_eq!(d[1].reason, "trust server unreachable");
        assert!(d[2].reason.contains("another host"), "{}", d[2].reason);
        assert!(d[3].reason.contains("invalid host name"), "{}", d[3].reason);
        assert!(d[0].verdict.is_none() && d[1].verdict.is_none());
    }
}
