//! The Kubernetes scheduler extender: the JSON of
//! `k8s.io/kube-scheduler/extender/v1` and the pure mapping from trust
//! decisions to `ExtenderFilterResult` and `HostPriorityList`.
//!
//! The upstream Go types carry no JSON tags, so kube-scheduler writes the Go
//! field names (`Pod`, `Nodes`, `NodeNames`) and reads ours case-insensitively;
//! we answer with the exact Go names and also accept lower-case requests.

use crate::decision::{effective_trust, Decision};
use chrono::{DateTime, Utc};
use proto::wire::Trust;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The pod label (or annotation) that asks for trusted nodes.
pub const TRUST_KEY: &str = "trust.attestation.io/required";
/// The only value of [`TRUST_KEY`] the extender knows.
pub const TRUST_VALUE: &str = "trusted";
/// kube-scheduler's `MaxExtenderPriority`: extender scores are 0..=10.
pub const MAX_PRIORITY: i64 = 10;

/// `ExtenderArgs`: the pod and its candidate nodes, either as whole Node
/// objects (`Nodes`) or, for `nodeCacheCapable` extenders, as names.
#[derive(Debug, Clone, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod")]
    pub pod: Option<Pod>,
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Option<Map<String, Value>>,
    #[serde(
        rename = "NodeNames",
        alias = "nodeNames",
        alias = "nodenames",
        default
    )]
    pub node_names: Option<Vec<String>>,
}

/// The parts of a `v1.Pod` the extender reads; everything else is ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExtenderFilterResult {
    /// The passing nodes, when the request carried whole nodes.
    #[serde(rename = "Nodes")]
    pub nodes: Option<Map<String, Value>>,
    /// The passing node names, when the request carried names.
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    /// Node name to the reason it cannot take the pod.
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(rename = "FailedAndUnresolvableNodes", default)]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    /// Non-empty when the whole call failed.
    #[serde(rename = "Error")]
    pub error: String,
}

impl ExtenderFilterResult {
    /// The body of a refused request: kube-scheduler reports `Error`.
    pub fn error(message: String) -> Self {
        Self {
            error: message,
            ..Self::default()
        }
    }
}

/// One `HostPriority` of the `HostPriorityList` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

/// What the pod asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// No trust label or annotation: every node is fine.
    None,
    /// Only trusted nodes.
    Trusted,
    /// The key is present with a value we do not know; no node can satisfy
    /// it, so it fails closed rather than passing the pod through.
    Invalid(String),
}

/// The request, checked: the pod's requirement and the candidates in order.
#[derive(Debug, Clone)]
pub struct Request {
    /// `namespace/name` of the pod, for logs and the placement audit.
    pub workload: String,
    pub requirement: Requirement,
    pub candidates: Candidates,
}

/// The candidate nodes in the form they came in, so the answer uses it too.
#[derive(Debug, Clone)]
pub enum Candidates {
    /// The `Nodes` NodeList without its items, and the items by name.
    Nodes {
        list: Map<String, Value>,
        items: Vec<(String, Value)>,
    },
    Names(Vec<String>),
}

impl Candidates {
    pub fn names(&self) -> Vec<String> {
        match self {
            Candidates::Nodes { items, .. } => items.iter().map(|(n, _)| n.clone()).collect(),
            Candidates::Names(n) => n.clone(),
        }
    }
}

/// Check the arguments: a pod, and exactly one of `Nodes` / `NodeNames`,
/// whose nodes all have names. The text of the error goes back in `Error`.
pub fn parse(args: ExtenderArgs) -> Result<Request, String> {
    let pod = args.pod.ok_or("ExtenderArgs has no Pod")?;
    let candidates = match (args.nodes, args.node_names) {
        (Some(_), Some(_)) => {
            return Err("ExtenderArgs has both Nodes and NodeNames; expected one".into())
        }
        (None, None) => return Err("ExtenderArgs has neither Nodes nor NodeNames".into()),
        (None, Some(names)) => Candidates::Names(names),
        (Some(mut list), None) => {
            let raw = match list.remove("items") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items,
                Some(_) => return Err("Nodes.items is not a list".into()),
            };
            let mut items = Vec::with_capacity(raw.len());
            for (i, node) in raw.into_iter().enumerate() {
                let name = node
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| format!("Nodes.items[{i}] has no metadata.name"))?
                    .to_string();
                items.push((name, node));
            }
            Candidates::Nodes { list, items }
        }
    };
    Ok(Request {
        workload: format!("{}/{}", pod.metadata.namespace, pod.metadata.name),
        requirement: requirement(&pod.metadata),
        candidates,
    })
}

/// The label wins over the annotation when both are set.
fn requirement(meta: &ObjectMeta) -> Requirement {
    let from =
        |m: &Option<BTreeMap<String, String>>| m.as_ref().and_then(|m| m.get(TRUST_KEY)).cloned();
    match from(&meta.labels).or_else(|| from(&meta.annotations)) {
        None => Requirement::None,
        Some(v) if v == TRUST_VALUE => Requirement::Trusted,
        Some(v) => Requirement::Invalid(v),
    }
}

/// Why a node failed, short enough for `kubectl describe pod`: the trust
/// the verdict carries now and its first reason code, or the lookup error.
pub fn failure_reason(d: &Decision, now: DateTime<Utc>) -> String {
    let Some(v) = &d.verdict else {
        return format!("unknown: {}", d.reason);
    };
    let trust = effective_trust(v, now);
    match v.reasons.first() {
        Some(r) if trust == v.trust => format!("{}: {}: {}", trust.as_str(), r.code, r.message),
        _ => format!("{}: {}", trust.as_str(), d.reason),
    }
}

/// The filter answer for `decisions` (one per candidate, in order).
pub fn filter_result(
    candidates: Candidates,
    decisions: &[Decision],
    now: DateTime<Utc>,
) -> ExtenderFilterResult {
    let mut failed = BTreeMap::new();
    let mut passes = Vec::with_capacity(decisions.len());
    for (i, name) in candidates.names().iter().enumerate() {
        // A candidate without a decision never passes.
        match decisions.get(i).filter(|d| &d.host == name) {
            Some(d) if d.allowed => passes.push(true),
            Some(d) => {
                failed.insert(name.clone(), failure_reason(d, now));
                passes.push(false);
            }
            None => {
                failed.insert(name.clone(), "unknown: no decision was made".into());
                passes.push(false);
            }
        }
    }
    let kept = |i: usize| passes.get(i).copied().unwrap_or(false);
    match candidates {
        Candidates::Nodes { mut list, items } => {
            let items: Vec<Value> = items
                .into_iter()
                .enumerate()
                .filter(|(i, _)| kept(*i))
                .map(|(_, (_, node))| node)
                .collect();
            list.insert("items".into(), Value::Array(items));
            ExtenderFilterResult {
                nodes: Some(list),
                failed_nodes: failed,
                ..Default::default()
            }
        }
        Candidates::Names(names) => ExtenderFilterResult {
            node_names: Some(
                names
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| kept(*i))
                    .map(|(_, n)| n)
                    .collect(),
            ),
            failed_nodes: failed,
            ..Default::default()
        },
    }
}

/// Every candidate passes, in the form it came in (pods that ask nothing).
pub fn pass_all(candidates: Candidates) -> ExtenderFilterResult {
    match candidates {
        Candidates::Nodes { mut list, items } => {
            list.insert(
                "items".into(),
                Value::Array(items.into_iter().map(|(_, n)| n).collect()),
            );
            ExtenderFilterResult {
                nodes: Some(list),
                ..Default::default()
            }
        }
        Candidates::Names(names) => ExtenderFilterResult {
            node_names: Some(names),
            ..Default::default()
        },
    }
}

/// Every candidate fails with the same reason.
pub fn fail_all(candidates: Candidates, reason: &str) -> ExtenderFilterResult {
    let names = candidates.names();
    let mut result = filter_result(candidates, &[], Utc::now());
    result.failed_nodes = names.into_iter().map(|n| (n, reason.to_string())).collect();
    result
}

/// Score of one node: 0 unless it passes as trusted; otherwise 1..=10,
/// linear in the share of its verdict's validity that is still left, so the
/// freshest verdicts win and any trusted node beats an untrusted one.
pub fn score(d: &Decision, now: DateTime<Utc>) -> i64 {
    let Some(v) = d.verdict.as_ref().filter(|_| d.allowed) else {
        return 0;
    };
    if effective_trust(v, now) != Trust::Trusted {
        return 0;
    }
    let (Some(verified), Some(expires)) = (v.verified_at, v.expires_at) else {
        return 0;
    };
    let lifetime = (expires - verified).num_milliseconds();
    let left = (expires - now).num_milliseconds().clamp(0, lifetime.max(0));
    if lifetime <= 0 || left == 0 {
        return 0;
    }
    // Round up: a trusted node never scores 0.
    let s = (MAX_PRIORITY * left + lifetime - 1) / lifetime;
    s.clamp(1, MAX_PRIORITY)
}

/// The prioritize answer: one entry per candidate, in order.
pub fn priorities(
    names: &[String],
    decisions: &[Decision],
    now: DateTime<Utc>,
) -> Vec<HostPriority> {
    names
        .iter()
        .enumerate()
        .map(|(i, host)| HostPriority {
            host: host.clone(),
            score: decisions
                .get(i)
                .filter(|d| &d.host == host)
                .map(|d| score(d, now))
                .unwrap_or(0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use proto::wire::{HostTrust, Reason};

    fn decision(host: &str, trust: Trust, age: i64, ttl: i64) -> Decision {
        let now = Utc::now();
        let verified = now - TimeDelta::seconds(age);
        Decision {
            host: host.into(),
            allowed: trust == Trust::Trusted,
            verdict: Some(HostTrust {
                host: host.into(),
                trust,
                verified_at: Some(verified),
                expires_at: Some(verified + TimeDelta::seconds(ttl)),
                reasons: if trust == Trust::Trusted {
                    vec![]
                } else {
                    vec![Reason {
                        step: "whitelist".into(),
                        code: "pcr_not_whitelisted".into(),
                        message: "PCR 7 differs".into(),
                        pcr: None,
                    }]
                },
                policy: None,
            }),
            reason: "r".into(),
        }
    }

    fn args(json: serde_json::Value) -> Result<Request, String> {
        parse(serde_json::from_value(json).map_err(|e| e.to_string())?)
    }

    #[test]
    fn requirement_from_label_or_annotation_and_bad_values_fail_closed() {
        let pod = |labels: serde_json::Value, ann: serde_json::Value| {
            args(serde_json::json!({
                "Pod": {"metadata": {"name": "p", "namespace": "ns", "labels": labels, "annotations": ann}},
                "NodeNames": ["a"]
            }))
            .unwrap()
        };
        let none = serde_json::Value::Null;
        let asks = serde_json::json!({TRUST_KEY: "trusted"});
        assert_eq!(
            pod(none.clone(), none.clone()).requirement,
            Requirement::None
        );
        assert_eq!(
            pod(asks.clone(), none.clone()).requirement,
            Requirement::Trusted
        );
        assert_eq!(
            pod(none.clone(), asks.clone()).requirement,
            Requirement::Trusted
        );
        let odd = serde_json::json!({TRUST_KEY: "yes"});
        assert_eq!(
            pod(odd, asks).requirement,
            Requirement::Invalid("yes".into())
        );
        assert_eq!(pod(none.clone(), none).workload, "ns/p");
    }

    #[test]
    fn malformed_arguments_are_named() {
        let e = args(serde_json::json!({"NodeNames": ["a"]})).unwrap_err();
        assert!(e.contains("no Pod"), "{e}");
        let e = args(serde_json::json!({"Pod": {}})).unwrap_err();
        assert!(e.contains("neither"), "{e}");
        let e = args(serde_json::json!({"Pod": {}, "Nodes": {"items": [{"metadata": {}}]}}))
            .unwrap_err();
        assert!(e.contains("items[0]"), "{e}");
        let e = args(serde_json::json!({"Pod": {}, "Nodes": {"items": 3}})).unwrap_err();
        assert!(e.contains("not a list"), "{e}");
        let e = args(serde_json::json!({"Pod": {}, "Nodes": {"items": []}, "NodeNames": []}))
            .unwrap_err();
        assert!(e.contains("both"), "{e}");
        // Lower-case keys, as some clients write them, are accepted.
        let ok = args(serde_json::json!({"pod": {}, "nodenames": ["x"]})).unwrap();
        assert_eq!(ok.candidates.names(), vec!["x".to_string()]);
    }

    #[test]
    fn filter_keeps_trusted_nodes_in_their_form_and_names_failures() {
        let now = Utc::now();
        let d = vec![
            decision("a", Trust::Trusted, 10, 300),
            decision("b", Trust::Untrusted, 10, 300),
        ];
        let names = Candidates::Names(vec!["a".into(), "b".into(), "c".into()]);
        let r = filter_result(names, &d, now);
        assert_eq!(r.node_names, Some(vec!["a".to_string()]));
        assert!(r.nodes.is_none());
        assert_eq!(
            r.failed_nodes["b"],
            "untrusted: pcr_not_whitelisted: PCR 7 differs"
        );
        assert!(
            r.failed_nodes["c"].starts_with("unknown"),
            "{:?}",
            r.failed_nodes
        );
        assert_eq!(r.failed_nodes.len(), 2);

        let req = args(serde_json::json!({
            "Pod": {"metadata": {"name": "p"}},
            "Nodes": {"metadata": {"resourceVersion": "7"}, "items": [
                {"metadata": {"name": "a", "labels": {"zone": "z1"}}},
                {"metadata": {"name": "b"}}
            ]}
        }))
        .unwrap();
        let r = filter_result(req.candidates, &d, now);
        let list = r.nodes.unwrap();
        assert_eq!(list["metadata"]["resourceVersion"], "7");
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(list["items"][0]["metadata"]["labels"]["zone"], "z1");
        assert!(r.node_names.is_none());
        assert_eq!(r.failed_nodes.keys().collect::<Vec<_>>(), vec!["b"]);

        let wire = serde_json::to_value(ExtenderFilterResult::error("bad".into())).unwrap();
        assert_eq!(wire["Error"], "bad");
        assert!(wire.get("FailedNodes").is_some());
    }

    #[test]
    fn fail_all_and_pass_all_cover_every_candidate() {
        let names = Candidates::Names(vec!["a".into(), "b".into()]);
        let r = fail_all(names.clone(), "trust server down");
        assert_eq!(r.node_names, Some(vec![]));
        assert_eq!(r.failed_nodes.len(), 2);
        assert_eq!(r.failed_nodes["a"], "trust server down");
        let r = pass_all(names);
        assert_eq!(r.node_names, Some(vec!["a".to_string(), "b".to_string()]));
        assert!(r.failed_nodes.is_empty());
    }

    #[test]
    fn fresher_verdicts_score_higher_and_untrusted_score_zero() {
        let fresh = decision("a", Trust::Trusted, 0, 100);
        let half = decision("b", Trust::Trusted, 50, 100);
        let old = decision("c", Trust::Trusted, 99, 100);
        let bad = decision("d", Trust::Untrusted, 0, 100);
        let gone = decision("e", Trust::Trusted, 101, 100);
        // Read after the verdicts were made: a hair of their validity is gone.
        let now = Utc::now();
        assert_eq!(score(&fresh, now), 10);
        assert_eq!(score(&half, now), 5);
        assert_eq!(score(&old, now), 1);
        assert_eq!(score(&bad, now), 0);
        assert_eq!(score(&gone, now), 0);
        let names: Vec<String> = ["a", "b", "x"].iter().map(|s| s.to_string()).collect();
        let p = priorities(&names, &[fresh, half], now);
        assert_eq!(
            p.iter().map(|h| h.score).collect::<Vec<_>>(),
            vec![10, 5, 0]
        );
        let wire = serde_json::to_value(&p[0]).unwrap();
        assert_eq!(wire, serde_json::json!({"Host": "a", "Score": 10}));
    }
}
