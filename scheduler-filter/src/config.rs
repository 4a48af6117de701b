//! `FilterConfig`: built-in defaults, then the TOML file, then
//! `SCHEDULER_FILTER_*` environment variables (`__` separates nested keys,
//! e.g. `SCHEDULER_FILTER_TLS__CA`).

use crate::error::Error;
use figment::providers::{Env, Format, Toml};
use figment::{Figment, Source};
use proto::client::TlsFiles;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "SCHEDULER_FILTER_";
/// Separator of nested keys in environment variable names.
const ENV_NESTING: &str = "__";

const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 5;
const DEFAULT_MAX_CACHE_SECS: u64 = 60;
/// Longer than this and a scheduler would stall on a dead server.
const MAX_REQUEST_TIMEOUT_SECS: u64 = 300;
/// A day: a verdict older than that says little about the host today.
const MAX_MAX_CACHE_SECS: u64 = 86_400;
/// kube-scheduler reaches extenders over the cluster network.
const DEFAULT_EXTENDER_LISTEN: &str = "0.0.0.0:8888";
/// The full-node form of ExtenderArgs carries whole Node objects (a few KiB
/// each); 32 MiB covers thousands of nodes.
const DEFAULT_EXTENDER_MAX_BODY_BYTES: usize = 32 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Base URL of the attestation server; must be `https://`.
    pub server_url: String,
    /// This scheduler's client identity and the operator CA.
    pub tls: TlsFiles,
    /// Connect and whole-request timeout of the trust query.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Upper bound on how long a verdict is reused, even when the server
    /// says it stays valid longer. 0 disables the cache.
    #[serde(default = "default_max_cache_secs")]
    pub max_cache_secs: u64,
    /// The Kubernetes scheduler extender (`scheduler-filter serve`).
    #[serde(default)]
    pub extender: ExtenderConfig,
}

/// `[extender]`: the HTTP(S) endpoint kube-scheduler calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExtenderConfig {
    /// Address to listen on; `serve --listen` overrides it.
    #[serde(default = "default_extender_listen")]
    pub listen: SocketAddr,
    /// PEM certificate (chain) to serve HTTPS with; plain HTTP when absent.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Report every filter decision to the server (`POST /v1/placements`).
    #[serde(default)]
    pub report_placements: bool,
    /// Largest request body accepted.
    #[serde(default = "default_extender_max_body_bytes")]
    pub max_body_bytes: usize,
}

impl Default for ExtenderConfig {
    fn default() -> Self {
        Self {
            listen: default_extender_listen(),
            tls_cert: None,
            tls_key: None,
            report_placements: false,
            max_body_bytes: DEFAULT_EXTENDER_MAX_BODY_BYTES,
        }
    }
}

fn default_extender_listen() -> SocketAddr {
    // A constant that always parses; the fallback only satisfies the types.
    DEFAULT_EXTENDER_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8888)))
}

fn default_extender_max_body_bytes() -> usize {
    DEFAULT_EXTENDER_MAX_BODY_BYTES
}

fn default_request_timeout_secs() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_SECS
}

fn default_max_cache_secs() -> u64 {
    DEFAULT_MAX_CACHE_SECS
}

/// Load the configuration: defaults, then `path` (if given; it must exist),
/// then the environment. Relative TLS paths from the file are resolved
/// against the file's directory; those from the environment are left
/// relative to the working directory.
pub fn load(path: Option<&Path>) -> Result<FilterConfig, Error> {
    let mut figment = Figment::new();
    if let Some(path) = path {
        // figment treats a missing file as empty; a scheduler pointed at a
        // wrong path must fail instead of running on the environment alone.
        if let Err(e) = std::fs::metadata(path) {
            return Err(Error::ConfigFile {
                path: path.to_path_buf(),
                problem: e.to_string(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(ENV_PREFIX).split(ENV_NESTING));

    let mut config: FilterConfig = figment.extract().map_err(|e| from_figment(e, path))?;
    config.tls.ca = resolve(&figment, "tls.ca", &config.tls.ca);
    config.tls.cert = resolve(&figment, "tls.cert", &config.tls.cert);
    config.tls.key = resolve(&figment, "tls.key", &config.tls.key);
    if let Some(p) = config.extender.tls_cert.take() {
        config.extender.tls_cert = Some(resolve(&figment, "extender.tls_cert", &p));
    }
    if let Some(p) = config.extender.tls_key.take() {
        config.extender.tls_key = Some(resolve(&figment, "extender.tls_key", &p));
    }
    config.validate(&figment)?;
    Ok(config)
}

impl FilterConfig {
    fn validate(&self, figment: &Figment) -> Result<(), Error> {
        let bad = |key: &str, problem: String| Error::ConfigKey {
            key: key.to_string(),
            origin: origin_of(figment, key),
            problem,
        };
        check_server_url(&self.server_url).map_err(|p| bad("server_url", p))?;
        if self.request_timeout_secs == 0 || self.request_timeout_secs > MAX_REQUEST_TIMEOUT_SECS {
            return Err(bad(
                "request_timeout_secs",
                format!(
                    "must be between 1 and {MAX_REQUEST_TIMEOUT_SECS}, got {}",
                    self.request_timeout_secs
                ),
            ));
        }
        if self.max_cache_secs > MAX_MAX_CACHE_SECS {
            return Err(bad(
                "max_cache_secs",
                format!(
                    "must be at most {MAX_MAX_CACHE_SECS}, got {}",
                    self.max_cache_secs
                ),
            ));
        }
        for (key, p) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if p.as_os_str().is_empty() {
                return Err(bad(key, "must not be empty".into()));
            }
        }
        let ext = &self.extender;
        match (&ext.tls_cert, &ext.tls_key) {
            (Some(_), None) => {
                return Err(bad(
                    "extender.tls_key",
                    "missing: extender.tls_cert is set, so the key is required".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "extender.tls_cert",
                    "missing: extender.tls_key is set, so the certificate is required".into(),
                ))
            }
            _ => {}
        }
        if ext.max_body_bytes < 1024 {
            return Err(bad(
                "extender.max_body_bytes",
                format!("must be at least 1024, got {}", ext.max_body_bytes),
            ));
        }
        Ok(())
    }
}

/// One or several (comma-separated, tried in order on failure) servers of
/// one pool, each `https://host[:port][/path]`.
fn check_server_url(setting: &str) -> Result<(), String> {
    let urls = proto::client::server_urls(setting);
    if urls.is_empty() {
        return Err("names no server".into());
    }
    urls.iter().try_for_each(|u| check_one_url(u))
}

/// Only `https://host[:port][/path]`: the filter never speaks plain HTTP and
/// a query string or credentials in the URL would be mangled by the client.
fn check_one_url(raw: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("not a URL ({e}): {raw:?}"))?;
    if url.scheme() != "https" {
        return Err(format!("must use https, got {}://", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(())
}

/// Make a relative path that came from the config file relative to the
/// file's directory, so the filter works from any working directory.
fn resolve(figment: &Figment, key: &str, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let from_file = figment
        .find_metadata(key)
        .and_then(|m| m.source.as_ref())
        .and_then(|s| match s {
            Source::File(f) => f.parent().map(Path::to_path_buf),
            _ => None,
        });
    match from_file {
        Some(dir) => dir.join(path),
        None => path.to_path_buf(),
    }
}

/// Human description of where a key's value came from.
fn origin_of(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(m) => describe_source(m, &key.split('.').collect::<Vec<_>>()),
        None => "default".into(),
    }
}

fn describe_source(m: &figment::Metadata, keys: &[&str]) -> String {
    match &m.source {
        Some(Source::File(f)) => format!("file {}", f.display()),
        _ if m.name.contains("environment") => format!(
            "environment variable {ENV_PREFIX}{}",
            keys.iter()
                .map(|k| k.to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join(ENV_NESTING)
        ),
        _ => m.name.to_string(),
    }
}

/// Turn figment's error into one that names the key and the problem.
fn from_figment(e: figment::Error, path: Option<&Path>) -> Error {
    let mut keys: Vec<String> = e.path.clone();
    match &e.kind {
        figment::error::Kind::UnknownField(name, expected) => {
            push_unless_last(&mut keys, name);
            return key_error(
                &e,
                keys,
                format!("unknown key; expected one of: {}", expected.join(", ")),
            );
        }
        figment::error::Kind::MissingField(name) => {
            push_unless_last(&mut keys, name);
            return key_error(&e, keys, "missing (required)".into());
        }
        _ => {}
    }
    if keys.is_empty() {
        // No key: the file itself is unreadable or not TOML.
        if let Some(path) = path {
            return Error::ConfigFile {
                path: path.to_path_buf(),
                problem: e.kind.to_string(),
            };
        }
    }
    let problem = e.kind.to_string();
    key_error(&e, keys, problem)
}

/// figment sometimes already ends the path with the offending field.
fn push_unless_last(keys: &mut Vec<String>, name: &str) {
    if keys.last().map(String::as_str) != Some(name) {
        keys.push(name.to_string());
    }
}

fn key_error(e: &figment::Error, keys: Vec<String>, problem: String) -> Error {
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let origin = match &e.metadata {
        Some(m) => describe_source(m, &refs),
        None => "configuration".into(),
    };
    Error::ConfigKey {
        key: if keys.is_empty() {
            "(root)".into()
        } else {
            keys.join(".")
        },
        origin,
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Environment variables are process-wide; tests that read or set them
    /// take this lock so they do not see each other's variables.
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    const MINIMAL: &str = r#"
server_url = "https://attest.example.org:8443"
[tls]
ca = "ca.pem"
cert = "scheduler.pem"
key = "/abs/scheduler.key"
"#;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("filter.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn clear_env() {
        for (k, _) in std::env::vars() {
            if k.starts_with(ENV_PREFIX) {
                std::env::remove_var(k);
            }
        }
    }

    #[test]
    fn defaults_apply_and_relative_paths_follow_the_file() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), MINIMAL);
        let c = load(Some(&path)).unwrap();
        assert_eq!(c.server_url, "https://attest.example.org:8443");
        assert_eq!(c.request_timeout_secs, DEFAULT_REQUEST_TIMEOUT_SECS);
        assert_eq!(c.max_cache_secs, DEFAULT_MAX_CACHE_SECS);
        assert_eq!(c.tls.ca, dir.path().join("ca.pem"));
        assert_eq!(c.tls.cert, dir.path().join("scheduler.pem"));
        // Absolute paths are kept as written.
        assert_eq!(c.tls.key, PathBuf::from("/abs/scheduler.key"));
    }

    #[test]
    fn environment_overrides_the_file() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), MINIMAL);
        std::env::set_var("SCHEDULER_FILTER_MAX_CACHE_SECS", "7");
        std::env::set_var("SCHEDULER_FILTER_TLS__CA", "env/ca.pem");
        let c = load(Some(&path));
        clear_env();
        let c = c.unwrap();
        assert_eq!(c.max_cache_secs, 7);
        // From the environment: relative to the working directory, not the file.
        assert_eq!(c.tls.ca, PathBuf::from("env/ca.pem"));
        assert_eq!(c.tls.cert, dir.path().join("scheduler.pem"));
    }

    #[test]
    fn environment_alone_is_enough() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        clear_env();
        std::env::set_var("SCHEDULER_FILTER_SERVER_URL", "https://10.0.0.1:8443/");
        std::env::set_var("SCHEDULER_FILTER_TLS__CA", "/c/ca.pem");
        std::env::set_var("SCHEDULER_FILTER_TLS__CERT", "/c/s.pem");
        std::env::set_var("SCHEDULER_FILTER_TLS__KEY", "/c/s.key");
        let c = load(None);
        clear_env();
        let c = c.unwrap();
        assert_eq!(c.server_url, "https://10.0.0.1:8443/");
        assert_eq!(c.tls.key, PathBuf::from("/c/s.key"));
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &format!("max_cache_sec = 3\n{MINIMAL}"));
        let err = load(Some(&path)).unwrap_err();
        match &err {
            Error::ConfigKey { key, problem, .. } => {
                assert_eq!(key, "max_cache_sec");
                assert!(problem.contains("unknown"), "{problem}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("max_cache_sec"));

        let nested = MINIMAL.replace("ca = ", "cafile = ");
        let path = write(dir.path(), &nested);
        match load(Some(&path)).unwrap_err() {
            Error::ConfigKey { key, .. } => assert_eq!(key, "tls.cafile"),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn invalid_values_name_the_key() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let plain = MINIMAL.replace("https://", "http://");
        let path = write(dir.path(), &plain);
        match load(Some(&path)).unwrap_err() {
            Error::ConfigKey {
                key,
                problem,
                origin,
            } => {
                assert_eq!(key, "server_url");
                assert!(problem.contains("https"), "{problem}");
                assert!(origin.contains("filter.toml"), "{origin}");
            }
            other => panic!("unexpected error {other:?}"),
        }

        let path = write(dir.path(), &format!("request_timeout_secs = 0\n{MINIMAL}"));
        match load(Some(&path)).unwrap_err() {
            Error::ConfigKey { key, .. } => assert_eq!(key, "request_timeout_secs"),
            other => panic!("unexpected error {other:?}"),
        }

        let path = write(dir.path(), &format!("max_cache_secs = \"soon\"\n{MINIMAL}"));
        match load(Some(&path)).unwrap_err() {
            Error::ConfigKey { key, .. } => assert_eq!(key, "max_cache_secs"),
            other => panic!("unexpected error {other:?}"),
        }

        std::env::set_var("SCHEDULER_FILTER_MAX_CACHE_SECS", "999999");
        let path = write(dir.path(), MINIMAL);
        let err = load(Some(&path));
        clear_env();
        match err.unwrap_err() {
            Error::ConfigKey { key, origin, .. } => {
                assert_eq!(key, "max_cache_secs");
                assert_eq!(
                    origin,
                    "environment variable SCHEDULER_FILTER_MAX_CACHE_SECS"
                );
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn extender_section_defaults_resolves_and_checks_pairs() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let c = load(Some(&write(dir.path(), MINIMAL))).unwrap();
        assert_eq!(c.extender, ExtenderConfig::default());
        assert_eq!(c.extender.listen.port(), 8888);
        assert!(!c.extender.report_placements);

        let text = format!(
            "{MINIMAL}[extender]\nlisten = \"127.0.0.1:9000\"\ntls_cert = \"ext.pem\"\ntls_key = \"ext.key\"\nreport_placements = true\n"
        );
        let c = load(Some(&write(dir.path(), &text))).unwrap();
        assert_eq!(c.extender.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.extender.tls_cert, Some(dir.path().join("ext.pem")));
        assert_eq!(c.extender.tls_key, Some(dir.path().join("ext.key")));
        assert!(c.extender.report_placements);

        let text = format!("{MINIMAL}[extender]\ntls_cert = \"ext.pem\"\n");
        match load(Some(&write(dir.path(), &text))).unwrap_err() {
            Error::ConfigKey { key, .. } => assert_eq!(key, "extender.tls_key"),
            other => panic!("unexpected error {other:?}"),
        }
        let text = format!("{MINIMAL}[extender]\nlisten = \"nowhere\"\n");
        match load(Some(&write(dir.path(), &text))).unwrap_err() {
            Error::ConfigKey { key, .. } => assert_eq!(key, "extender.listen"),
            other => panic!("unexpected error {other:?}"),
        }
        let text = format!("{MINIMAL}[extender]\nreport_placement = true\n");
        match load(Some(&write(dir.path(), &text))).unwrap_err() {
            Error::ConfigKey { key, .. } => assert_eq!(key, "extender.report_placement"),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn missing_required_key_and_missing_file() {
        let _g = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        clear_env();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n");
        match load(Some(&path)).unwrap_err() {
            Error::ConfigKey { key, problem, .. } => {
                assert_eq!(key, "server_url");
                assert!(problem.contains("missing"), "{problem}");
            }
            other => panic!("unexpected error {other:?}"),
        }

        let path = write(
            dir.path(),
            "server_url = \"https://a\"\n[tls]\nca = \"a\"\ncert = \"b\"\n",
        );
        match load(Some(&path)).unwrap_err() {
            Error::ConfigKey { key, .. } => assert_eq!(key, "tls.key"),
            other => panic!("unexpected error {other:?}"),
        }

        let absent = dir.path().join("absent.toml");
        match load(Some(&absent)).unwrap_err() {
            Error::ConfigFile { path, .. } => assert_eq!(path, absent),
            other => panic!("unexpected error {other:?}"),
        }

        let path = write(dir.path(), "server_url = \n");
        assert!(matches!(
            load(Some(&path)).unwrap_err(),
            Error::ConfigFile { .. }
        ));
    }
}
