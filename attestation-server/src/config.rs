//! Server configuration: defaults, then a TOML file, then environment
//! variables (`ATTEST_SERVER_` prefix, `__` between nested keys, e.g.
//! `ATTEST_SERVER_TLS__CERT`).

use crate::error::Error;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use proto::tpm::MAX_PCR;
use proto::wire::PcrSelectionMap;
use proto::HashAlg;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A value that must not reach logs (a database URL may carry a password).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Name of this server in audit events (the CADF observer).
    pub name: String,
    /// Address of the mutual-TLS API listener.
    pub listen: SocketAddr,
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST/DB`.
    pub database_url: Secret,
    /// JSON-lines file every audit event is appended to; none to disable.
    /// Shorthand for `[audit.file] path = …` (which wins when both are set).
    pub audit_file: Option<PathBuf>,
    /// Audit trail: sinks, retention, hash-chain checkpoints.
    pub audit: crate::audit::AuditConfig,
    /// How long a verdict stays valid without new evidence.
    pub freshness_secs: u64,
    /// How long an issued nonce can be answered.
    pub challenge_ttl_secs: u64,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Largest accepted evidence body: evidence carries the UEFI event log
    /// and IMA entries when the host's policy asks for them.
    pub max_evidence_bytes: usize,
    /// The PCRs every challenge asks for.
    pub pcr_selection: PcrSelectionMap,
    /// TPM manufacturer CA certificates (PEM or DER files, or directories of
    /// them) that EK certificates must chain to.
    pub ek_ca: Vec<PathBuf>,
    /// Hosts allowed to enroll a TPM that has no EK certificate; each such
    /// enrollment is logged as a warning and marked in its audit event.
    pub allow_without_ek_certificate: Vec<String>,
    /// How long an enrollment's credential can be activated.
    pub enrollment_ttl_secs: u64,
    pub tls: ServerTls,
    /// PKCS#8 PEM P-256 key that signs host-trust tokens and trust-change
    /// notifications; none disables both.
    pub token_key: Option<PathBuf>,
    /// Longest lifetime of a host-trust token (never past the verdict's expiry).
    pub token_ttl_secs: u64,
    /// CA bundle that trust-change subscribers' HTTPS certificates must chain
    /// to; none means the pool CA (`tls.client_ca`).
    pub push_ca: Option<PathBuf>,
    /// OpenAttestation-compatible listener for OpenStack Nova's TrustedFilter.
    pub oat: OatConfig,
    /// Most TLS connections served at once; more clients wait in the
    /// kernel's listen backlog until one closes.
    pub max_connections: usize,
    /// Longest time one request may take, reading its body included
    /// (`408 request_timeout` after): a slow client cannot hold a worker.
    pub request_timeout_secs: u64,
    /// Refused evidence submissions (not genuine: bad signature, replayed
    /// nonce, malformed) a host may make in a row before its challenge and
    /// evidence requests get `429 too_many_failures` without being judged.
    pub failure_burst: u32,
    /// Once throttled, one more attempt per this many seconds; an accepted
    /// attestation gives the host its full burst back.
    pub failure_refill_secs: u64,
    /// `text` (default) or `json`: one JSON object per log line, carrying
    /// the request id of the request it belongs to.
    pub log_format: crate::logging::LogFormat,
}

/// The `[oat]` section: the PollHosts listener (off unless `listen` is set).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OatConfig {
    /// Address of the HTTPS listener (server certificate, no client certificate).
    pub listen: Option<SocketAddr>,
    /// Path prefix of `PollHosts` (nova.conf `attestation_api_url`).
    pub api_url: String,
    /// Shared secret Nova sends as `x-auth-blob` (`attestation_auth_blob`).
    pub auth_blob: Secret,
    /// Most hosts one poll may name.
    pub max_hosts: usize,
}

impl Default for OatConfig {
    fn default() -> Self {
        Self {
            listen: None,
            api_url: "/OpenAttestationWebServices/V1.0".into(),
            auth_blob: Secret::default(),
            max_hosts: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM bundle of the CA(s) whose client certificates are accepted.
    pub client_ca: PathBuf,
    /// TLS 1.3 cipher suites offered, in the server's order of preference
    /// (the server's order decides, not the client's).
    pub cipher_suites: Vec<TlsSuite>,
}

/// A TLS 1.3 cipher suite, by its IANA name.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum TlsSuite {
    #[serde(rename = "TLS_AES_128_GCM_SHA256")]
    Aes128GcmSha256,
    #[serde(rename = "TLS_AES_256_GCM_SHA384")]
    Aes256GcmSha384,
    #[serde(rename = "TLS_CHACHA20_POLY1305_SHA256")]
    Chacha20Poly1305Sha256,
}

impl TlsSuite {
    /// AES-128-GCM first: with X25519 (the key exchange clients offer
    /// first) and P-256 certificates (what `attestctl init` issues) a
    /// session has ~128-bit security whatever the cipher, and SHA-256 (its
    /// key schedule and transcript hash) runs in the CPU's SHA extensions
    /// where SHA-384 does not: 8% more attestations per second
    /// (docs/benchmarks.md).
    pub const DEFAULT_ORDER: [TlsSuite; 3] = [
        TlsSuite::Aes128GcmSha256,
        TlsSuite::Aes256GcmSha384,
        TlsSuite::Chacha20Poly1305Sha256,
    ];
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            name: "attestation-server".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            database_url: Secret("sqlite://attest.db".into()),
            audit_file: None,
            audit: crate::audit::AuditConfig::default(),
            freshness_secs: 120,
            challenge_ttl_secs: 60,
            max_body_bytes: 64 * 1024,
            max_evidence_bytes: 16 * 1024 * 1024,
            pcr_selection: [(HashAlg::Sha256, (0..=10).collect())]
                .into_iter()
                .collect(),
            ek_ca: Vec::new(),
            allow_without_ek_certificate: Vec::new(),
            enrollment_ttl_secs: 300,
            tls: ServerTls {
                cert: "server.pem".into(),
                key: "server.key".into(),
                client_ca: "ca.pem".into(),
                cipher_suites: TlsSuite::DEFAULT_ORDER.to_vec(),
            },
            token_key: None,
            token_ttl_secs: 300,
            push_ca: None,
            oat: OatConfig::default(),
            max_connections: 4096,
            request_timeout_secs: 30,
            failure_burst: 10,
            failure_refill_secs: 30,
            log_format: crate::logging::LogFormat::Text,
        }
    }
}

pub const ENV_PREFIX: &str = "ATTEST_SERVER_";

impl ServerConfig {
    /// Load defaults, then `file` (if given), then the environment; resolve
    /// relative paths against the file's directory; validate.
    pub fn load(file: Option<&Path>) -> Result<Self, Error> {
        let mut fig = Figment::from(Serialized::defaults(ServerConfig::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(Error::Config {
                    key: "--config".into(),
                    problem: format!("file {} does not exist", f.display()),
                });
            }
            fig = fig.merge(Toml::file(f));
        }
        // ATTEST_SERVER_CONFIG names the file (see the binary), it is not a key.
        fig = fig.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]));
        let mut cfg: ServerConfig = fig.extract().map_err(config_error)?;
        if let Some(base) = file.and_then(Path::parent) {
            cfg.resolve_paths(base);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        if let Some(a) = self.audit_file.as_mut() {
            fix(a);
        }
        self.audit.resolve_paths(base);
        self.ek_ca.iter_mut().for_each(fix);
        if let Some(k) = self.token_key.as_mut() {
            fix(k);
        }
        if let Some(c) = self.push_ca.as_mut() {
            fix(c);
        }
        // sqlite://relative/path is relative to the config file too.
        if let Some(rest) = self.database_url.0.strip_prefix("sqlite://") {
            let (path, query) = rest
                .split_once('?')
                .map_or((rest, None), |(p, q)| (p, Some(q)));
            if !path.is_empty() && !path.starts_with('/') && path != ":memory:" {
                let abs = base.join(path);
                self.database_url.0 = match query {
                    Some(q) => format!("sqlite://{}?{q}", abs.display()),
                    None => format!("sqlite://{}", abs.display()),
                };
            }
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, problem: String| {
            Err(Error::Config {
                key: key.into(),
                problem,
            })
        };
        self.audit.validate()?;
        if self.freshness_secs == 0 {
            return bad("freshness_secs", "must be at least 1".into());
        }
        if self.enrollment_ttl_secs == 0 {
            return bad("enrollment_ttl_secs", "must be at least 1".into());
        }
        if let Some(h) = self
            .allow_without_ek_certificate
            .iter()
            .find(|h| !proto::wire::valid_host_name(h))
        {
            return bad(
                "allow_without_ek_certificate",
                format!("{h:?} is not a valid host name"),
            );
        }
        if self.challenge_ttl_secs == 0 {
            return bad("challenge_ttl_secs", "must be at least 1".into());
        }
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes", "must be at least 1024".into());
        }
        if self.max_evidence_bytes < 1024 {
            return bad("max_evidence_bytes", "must be at least 1024".into());
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1".into());
        }
        if self.request_timeout_secs == 0 {
            return bad("request_timeout_secs", "must be at least 1".into());
        }
        if self.failure_burst == 0 {
            return bad("failure_burst", "must be at least 1".into());
        }
        if !(1..=86_400).contains(&self.failure_refill_secs) {
            return bad("failure_refill_secs", "must be 1-86400".into());
        }
        let url = &self.database_url.0;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return bad(
                "database_url",
                "must start with sqlite:// or postgres://".into(),
            );
        }
        if self.token_ttl_secs == 0 {
            return bad("token_ttl_secs", "must be at least 1".into());
        }
        if self.oat.listen.is_some() && self.oat.auth_blob.0.is_empty() {
            return bad(
                "oat.auth_blob",
                "must be set when oat.listen is (Nova's attestation_auth_blob)".into(),
            );
        }
        if !self.oat.api_url.starts_with('/') || self.oat.api_url.ends_with('/') {
            return bad(
                "oat.api_url",
                "must start with / and not end with / (e.g. /OpenAttestationWebServices/V1.0)"
                    .into(),
            );
        }
        if self.oat.max_hosts == 0 {
            return bad("oat.max_hosts", "must be at least 1".into());
        }
        if self.tls.cipher_suites.is_empty() {
            return bad(
                "tls.cipher_suites",
                "must name at least one suite (TLS_AES_128_GCM_SHA256, \
                 TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256)"
                    .into(),
            );
        }
        if self.pcr_selection.values().all(|v| v.is_empty()) {
            return bad("pcr_selection", "must select at least one PCR".into());
        }
        for (bank, pcrs) in &self.pcr_selection {
            if let Some(p) = pcrs.iter().find(|p| **p > MAX_PCR) {
                return bad(
                    &format!("pcr_selection.{bank}"),
                    format!("PCR {p} is outside 0-{MAX_PCR}"),
                );
            }
        }
        Ok(())
    }
}

/// Turn a figment error into "key: problem".
pub fn config_error(e: figment::Error) -> Error {
    let key = if e.path.is_empty() {
        "(top level)".to_string()
    } else {
        e.path.join(".")
    };
    Error::Config {
        key,
        problem: e.kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_redact_the_database_url() {
        let cfg = ServerConfig {
            database_url: Secret("postgres://u:hunter2@db/x".into()),
            ..ServerConfig::default()
        };
        cfg.validate().unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the error type
    fn file_then_env_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("server.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9000\"\ndatabase_url = \"sqlite://db/x.db\"\n[tls]\ncert = \"s.pem\"\nkey = \"s.key\"\nclient_ca = \"/etc/ca.pem\"\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("ATTEST_SERVER_FRESHNESS_SECS", "7");
            jail.set_env(
                "ATTEST_SERVER_TLS__CIPHER_SUITES",
                "[\"TLS_AES_256_GCM_SHA384\"]",
            );
            let cfg = ServerConfig::load(Some(&f)).unwrap();
            assert_eq!(cfg.tls.cipher_suites, vec![TlsSuite::Aes256GcmSha384]);
            assert_eq!(cfg.listen.port(), 9000);
            assert_eq!(cfg.freshness_secs, 7);
            assert_eq!(cfg.tls.cert, dir.path().join("s.pem"));
            assert_eq!(cfg.tls.client_ca, PathBuf::from("/etc/ca.pem"));
            assert_eq!(
                cfg.database_url.0,
                format!("sqlite://{}/db/x.db", dir.path().display())
            );
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("server.toml");
        std::fs::write(&f, "listen = \"nowhere\"\n").unwrap();
        match ServerConfig::load(Some(&f)) {
            Err(Error::Config { key, .. }) => assert_eq!(key, "listen"),
            other => panic!("expected a config error, got {other:?}"),
        }
        std::fs::write(&f, "lisen = \"127.0.0.1:1\"\n").unwrap();
        match ServerConfig::load(Some(&f)) {
            Err(Error::Config { problem, .. }) => assert!(problem.contains("lisen"), "{problem}"),
            other => panic!("expected a config error, got {other:?}"),
        }
        std::fs::write(
            &f,
            "[tls]\ncipher_suites = [\"TLS_RSA_WITH_RC4_128_MD5\"]\n",
        )
        .unwrap();
        match ServerConfig::load(Some(&f)) {
            Err(Error::Config { key, problem }) => {
                assert!(key.starts_with("tls.cipher_suites"), "{key}");
                assert!(problem.contains("TLS_AES_128_GCM_SHA256"), "{problem}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        std::fs::write(&f, "[tls]\ncipher_suites = []\n").unwrap();
        match ServerConfig::load(Some(&f)) {
            Err(Error::Config { key, .. }) => assert_eq!(key, "tls.cipher_suites"),
            other => panic!("expected a config error, got {other:?}"),
        }
        std::fs::write(&f, "[pcr_selection]\nsha256 = [24]\n").unwrap();
        match ServerConfig::load(Some(&f)) {
            Err(Error::Config { key, .. }) => assert_eq!(key, "pcr_selection.sha256"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}
