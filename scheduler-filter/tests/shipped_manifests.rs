//! The Kubernetes manifests in deploy/kubernetes/ stay in step with the code:
//! the ConfigMap's TOML loads, and the scheduler configuration names the
//! verbs the extender serves.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::PathBuf;

fn manifest(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn configmap_toml_loads_with_the_extender_section() {
    let toml = test_support::yaml_block(
        &manifest("scheduler-extender.yaml"),
        "scheduler-filter.toml",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler-filter.toml");
    std::fs::write(&path, toml).unwrap();
    let c = scheduler_filter::load(Some(&path)).unwrap();
    assert_eq!(c.extender.listen.port(), 8888);
    assert!(c.extender.report_placements);
    assert_eq!(
        c.extender.tls_cert.as_deref(),
        Some("/etc/scheduler-filter/serving/tls.crt".as_ref())
    );
}

#[test]
fn scheduler_configuration_calls_our_verbs_and_fails_closed() {
    let yaml = manifest("scheduler-config.yaml");
    for line in [
        "kind: KubeSchedulerConfiguration",
        "filterVerb: filter",
        "prioritizeVerb: prioritize",
        "nodeCacheCapable: true",
        "ignorable: false",
        "urlPrefix: \"https://scheduler-filter.trusted-pool.svc:8888\"",
    ] {
        assert!(
            yaml.lines()
                .any(|l| l.trim().trim_start_matches("- ") == line),
            "missing {line}"
        );
    }
    // The Service and the container port agree with the URL.
    let deploy = manifest("scheduler-extender.yaml");
    assert!(deploy.contains("containerPort: 8888"));
    assert!(deploy.contains("port: 8888"));
}
