//! Placement audit: the decisions a scheduler made for one workload, as the
//! server records them (`POST /v1/placements`, one CADF event each).

use crate::decision::{effective_trust, Decision};
use chrono::{DateTime, Utc};
use proto::wire::Trust;
use serde::{Deserialize, Serialize};

pub const PLACEMENTS_PATH: &str = "/v1/placements";

/// `POST /v1/placements` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlacementReport {
    /// What was placed, e.g. `namespace/pod`.
    pub workload: String,
    pub decisions: Vec<PlacementDecision>,
}

/// One candidate host: allowed or denied, with the verdict used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlacementDecision {
    pub host: String,
    pub allowed: bool,
    /// The trust the verdict carried at decision time (`unknown` without one).
    pub trust: Trust,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
}

/// The server's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlacementRecorded {
    pub recorded: usize,
}

/// The report of `decisions` as judged at `now`.
pub fn report(workload: &str, decisions: &[Decision], now: DateTime<Utc>) -> PlacementReport {
    PlacementReport {
        workload: workload.to_string(),
        decisions: decisions
            .iter()
            .map(|d| PlacementDecision {
                host: d.host.clone(),
                allowed: d.allowed,
                trust: d
                    .verdict
                    .as_ref()
                    .map(|v| effective_trust(v, now))
                    .unwrap_or(Trust::Unknown),
                verified_at: d.verdict.as_ref().and_then(|v| v.verified_at),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use proto::wire::HostTrust;

    #[test]
    fn report_carries_the_trust_used_and_omits_missing_times() {
        let now = Utc::now();
        let verified = now - TimeDelta::seconds(5);
        let d = vec![
            Decision {
                host: "a".into(),
                allowed: true,
                verdict: Some(HostTrust {
                    host: "a".into(),
                    trust: Trust::Trusted,
                    verified_at: Some(verified),
                    expires_at: Some(now + TimeDelta::seconds(60)),
                    reasons: vec![],
                    policy: None,
                }),
                reason: "ok".into(),
            },
            Decision {
                host: "b".into(),
                allowed: false,
                verdict: None,
                reason: "server down".into(),
            },
        ];
        let r = report("ns/pod", &d, now);
        let wire = serde_json::to_value(&r).unwrap();
        assert_eq!(
            wire,
            serde_json::json!({
                "workload": "ns/pod",
                "decisions": [
                    {"host": "a", "allowed": true, "trust": "trusted",
                     "verified_at": serde_json::to_value(verified).unwrap()},
                    {"host": "b", "allowed": false, "trust": "unknown"}
                ]
            })
        );
    }
}
