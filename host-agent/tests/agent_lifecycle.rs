//! The agent as a whole, without an attestation server (the end-to-end tests
//! with the server live elsewhere): `run` keeps retrying while the server is
//! unreachable and stops cleanly on shutdown; the binary refuses a bad config
//! with exit code 2 and exits 0 on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use host_agent::config::AgentConfig;
use host_agent::AkType;
use proto::client::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use test_support::SwTpm;

const DEADLINE: Duration = Duration::from_secs(60);

/// An operator CA and an agent certificate (OU=agent, CN=host), PEM files.
fn make_pki(dir: &Path, host: &str) -> TlsFiles {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test operator CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, host);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, "agent");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{host}.pem")),
        key: dir.join(format!("{host}.key")),
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

/// An https URL on which nothing listens.
fn dead_server_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("https://127.0.0.1:{port}")
}

fn wait_for_file(path: &Path) {
    let start = Instant::now();
    while !path.is_file() {
        assert!(
            start.elapsed() < DEADLINE,
            "{} not created within {DEADLINE:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_backs_off_while_server_is_down_and_stops_on_shutdown() {
    let swtpm = SwTpm::start().expect("swtpm starts");
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig {
        host: "node1".into(),
        server_url: dead_server_url(),
        tcti: swtpm.tcti(),
        ak_type: AkType::Ecc,
        interval_secs: 1,
        state_dir: dir.path().join("state"),
        request_timeout_secs: 2,
        backoff_max_secs: 1,
        tls: make_pki(dir.path(), "node1"),
        uefi_log_path: dir.path().join("binary_bios_measurements"),
        ima_log_path: dir.path().join("ascii_runtime_measurements"),
    };
    config.validate().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(host_agent::run(config, async {
        let _ = stopped.await;
    }));

    // The agent made its AK (first step of enrolling), then kept retrying
    // the unreachable server instead of exiting.
    let ak_pub = dir.path().join("state/ak-ecc.pub");
    tokio::task::spawn_blocking(move || wait_for_file(&ak_pub))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !agent.is_finished(),
        "run() returned while the server was down"
    );

    let _ = stop.send(());
    let outcome = tokio::time::timeout(DEADLINE, agent)
        .await
        .expect("run() stops after shutdown")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");

    // The TPM is free and clean: another client can use it right away.
    swtpm
        .pcr_extend(12, "sha256", &"11".repeat(32))
        .expect("swtpm is free after shutdown");
    let out = swtpm
        .run_tool("tpm2_getcap", ["handles-transient"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_to_start_with_unusable_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut tls = make_pki(dir.path(), "node1");
    // A certificate where the key should be.
    tls.key = tls.cert.clone();
    let config = AgentConfig {
        host: "node1".into(),
        server_url: dead_server_url(),
        tcti: "swtpm:host=127.0.0.1,port=1".into(),
        ak_type: AkType::Rsa,
        interval_secs: 1,
        state_dir: dir.path().join("state"),
        request_timeout_secs: 2,
        backoff_max_secs: 1,
        tls,
        uefi_log_path: dir.path().join("binary_bios_measurements"),
        ima_log_path: dir.path().join("ascii_runtime_measurements"),
    };
    let outcome = tokio::time::timeout(DEADLINE, host_agent::run(config, std::future::pending()))
        .await
        .expect("run() returns");
    match outcome {
        Err(host_agent::Error::Config { key, .. }) => assert_eq!(key, "tls"),
        other => panic!("expected a tls config error, got {other:?}"),
    }
}

fn agent_binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_host-agent"));
    // The test's own environment must not leak into the agent's config.
    for (key, _) in std::env::vars() {
        if key.starts_with(host_agent::config::ENV_PREFIX) {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn write_config(dir: &Path, extra: &str, tcti: &str) -> PathBuf {
    make_pki(dir, "node1");
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "{extra}\n\
             host = \"node1\"\n\
             server_url = \"{}\"\n\
             tcti = \"{tcti}\"\n\
             ak_type = \"ecc\"\n\
             interval_secs = 1\n\
             backoff_max_secs = 1\n\
             state_dir = \"state\"\n\
             [tls]\n\
             ca = \"ca.pem\"\n\
             cert = \"node1.pem\"\n\
             key = \"node1.key\"\n",
            dead_server_url()
        ),
    )
    .unwrap();
    path
}

#[test]
fn binary_exits_2_naming_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "intervall_secs = 5", "device:/dev/tpmrm0");
    let out = agent_binary()
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("intervall_secs"), "{stderr}");

    let out = agent_binary()
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // The environment layer is validated too.
    let config = write_config(dir.path(), "", "device:/dev/tpmrm0");
    let out = agent_binary()
        .arg("--config")
        .arg(&config)
        .env("HOST_AGENT_INTERVAL_SECS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interval_secs"), "{stderr}");
}

#[test]
fn binary_stops_cleanly_on_sigterm() {
    let swtpm = SwTpm::start().expect("swtpm starts");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "", &swtpm.tcti());
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut child = agent_binary()
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();

    // Relative state_dir resolved against the config's directory.
    wait_for_file(&dir.path().join("state/ak-ecc.pub"));
    assert!(child.try_wait().unwrap().is_none(), "agent exited early");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("agent did not stop within {DEADLINE:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("shutting down"), "{log}");
    swtpm
        .pcr_extend(12, "sha256", &"22".repeat(32))
        .expect("swtpm is free after the agent exited");
}
