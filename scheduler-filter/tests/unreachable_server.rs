//! With a valid TLS identity but no server listening, the filter must fail
//! closed and say that the server is the problem.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use proto::client::TlsFiles;
use proto::wire::Trust;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use scheduler_filter::{FilterConfig, TrustFilter};
use std::net::TcpListener;
use std::path::Path;

/// A throwaway CA and a scheduler client certificate, as the operator's
/// tooling would issue them.
fn write_identity(dir: &Path) -> TlsFiles {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test operator CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "scheduler-1");
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, "scheduler");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("scheduler.pem"),
        key: dir.join("scheduler.key"),
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

#[tokio::test]
async fn unreachable_server_lets_no_host_pass() {
    let dir = tempfile::tempdir().unwrap();
    let server_url = format!("https://127.0.0.1:{}", closed_port());
    let config = FilterConfig {
        server_url: server_url.clone(),
        tls: write_identity(dir.path()),
        extender: Default::default(),
        request_timeout_secs: 2,
        max_cache_secs: 60,
    };
    // The identity is valid, so building the client succeeds; only the
    // server is missing.
    let filter = TrustFilter::new(&config).unwrap();
    let hosts = vec!["node-1".to_string(), "node-2".to_string()];

    assert!(filter.filter(&hosts, Trust::Trusted).await.is_empty());
    assert!(filter.filter(&hosts, Trust::Untrusted).await.is_empty());

    let decisions = filter.decide(&hosts, Trust::Trusted).await;
    assert_eq!(decisions.len(), 2);
    for (d, host) in decisions.iter().zip(&hosts) {
        assert_eq!(&d.host, host);
        assert!(!d.allowed);
        assert!(d.verdict.is_none());
        assert!(d.reason.contains("trust server"), "{}", d.reason);
        assert!(d.reason.contains(&server_url), "{}", d.reason);
    }
}

#[test]
fn unreadable_identity_is_a_client_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = FilterConfig {
        server_url: "https://127.0.0.1:1".into(),
        tls: TlsFiles {
            ca: dir.path().join("missing-ca.pem"),
            cert: dir.path().join("missing.pem"),
            key: dir.path().join("missing.key"),
        },
        request_timeout_secs: 2,
        max_cache_secs: 60,
        extender: Default::default(),
    };
    match TrustFilter::new(&config) {
        Err(scheduler_filter::Error::Client { server_url, .. }) => {
            assert_eq!(server_url, "https://127.0.0.1:1")
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a filter without certificate files was built"),
    }
}
