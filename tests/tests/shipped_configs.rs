//! Every configuration example shipped in deploy/examples parses with its
//! program's own loader (or, for the agent, whose loader also checks that
//! the TLS files exist, with its own typed config), so the examples cannot
//! drift from the code.

use std::path::PathBuf;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

#[test]
fn server_example_loads() {
    let c = attestation_server::config::ServerConfig::load(Some(&example("server.toml"))).unwrap();
    assert_eq!(c.listen.port(), 8443);
    assert_eq!((c.max_connections, c.request_timeout_secs), (4096, 30));
    assert_eq!(c.log_format, attestation_server::logging::LogFormat::Json);
    assert_eq!(
        c.ek_ca,
        vec![PathBuf::from("/etc/attestation-server/ek-ca")]
    );
    assert_eq!(
        c.tls.cipher_suites,
        attestation_server::config::TlsSuite::DEFAULT_ORDER
    );
}

#[test]
fn admin_example_loads() {
    let c = attestation_server::ctl::CtlConfig::load(&example("admin.toml")).unwrap();
    assert_eq!(c.server_url, "https://attest.example.org:8443");
}

#[test]
fn scheduler_example_loads() {
    let c = scheduler_filter::load(Some(&example("scheduler.toml"))).unwrap();
    assert_eq!(c.max_cache_secs, 60);
}

#[test]
fn agent_example_loads() {
    // The agent's loader insists that the TLS files exist: point those
    // three keys at real files through the environment layer; every other
    // key comes from the example.
    let dir = tempfile::tempdir().unwrap();
    for (key, file) in [
        ("CA", "ca.pem"),
        ("CERT", "agent.pem"),
        ("KEY", "agent.key"),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, "placeholder").unwrap();
        std::env::set_var(format!("HOST_AGENT_TLS__{key}"), &path);
    }
    let c = host_agent::config::load(Some(&example("agent.toml"))).unwrap();
    assert_eq!(c.host, "compute-17.example.org");
    assert_eq!(c.tcti, "device:/dev/tpmrm0");
    assert_eq!(c.interval_secs, 30);
}

/// The server's ConfigMap in the Kubernetes manifest is a config file too.
#[test]
fn kubernetes_server_configmap_loads() {
    let yaml = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/attestation-server.yaml"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        test_support::yaml_block(&yaml, "server.toml").unwrap(),
    )
    .unwrap();
    let c = attestation_server::config::ServerConfig::load(Some(&path)).unwrap();
    assert_eq!(c.listen.port(), 8443);
    assert_eq!(c.log_format, attestation_server::logging::LogFormat::Json);
    assert_eq!(
        c.tls.cert,
        PathBuf::from("/etc/attestation-server/tls/server.pem")
    );
    assert_eq!(
        c.token_key,
        Some(PathBuf::from("/etc/attestation-server/tls/token.key"))
    );
    // The Deployment mounts the secrets where the file says they are.
    for mount in [
        "/etc/attestation-server/tls",
        "/etc/attestation-server/ek-ca",
    ] {
        assert!(yaml.contains(&format!("mountPath: {mount},")), "{mount}");
    }
}
