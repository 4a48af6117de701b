//! The recorded kube-scheduler requests under `tests/fixtures/` parse into
//! the pod's requirement and the candidates, in both upstream forms.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use scheduler_filter::extender::{self, Candidates, ExtenderArgs, Requirement};

fn fixture(name: &str) -> ExtenderArgs {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn full_node_form_with_the_label() {
    let req = extender::parse(fixture("filter-nodes.json")).unwrap();
    assert_eq!(req.requirement, Requirement::Trusted);
    assert_eq!(req.workload, "payments/payments-api-0");
    assert!(matches!(req.candidates, Candidates::Nodes { .. }));
    assert_eq!(req.candidates.names(), vec!["node1", "node2", "ghost-7"]);
    // No decisions at all: every node fails, none is silently kept.
    let r = extender::filter_result(req.candidates, &[], chrono::Utc::now());
    assert_eq!(r.nodes.unwrap()["items"].as_array().unwrap().len(), 0);
    assert_eq!(r.failed_nodes.len(), 3);
}

#[test]
fn node_names_form_with_the_annotation() {
    let req = extender::parse(fixture("filter-nodenames.json")).unwrap();
    assert_eq!(req.requirement, Requirement::Trusted);
    assert_eq!(req.workload, "finance/ledger-0");
    assert!(matches!(req.candidates, Candidates::Names(_)));
    assert_eq!(req.candidates.names(), vec!["node1", "node2", "ghost-7"]);
}

#[test]
fn untagged_pod_passes_through() {
    let req = extender::parse(fixture("filter-untagged-nodenames.json")).unwrap();
    assert_eq!(req.requirement, Requirement::None);
    let r = extender::pass_all(req.candidates);
    assert_eq!(r.node_names.unwrap(), vec!["node1", "node2", "ghost-7"]);
    assert!(r.failed_nodes.is_empty());
}
