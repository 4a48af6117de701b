//! Agent configuration: built-in defaults, then an optional TOML file, then
//! `HOST_AGENT_*` environment variables (`__` separates nested keys).

use crate::error::Error;
use crate::tpm;
use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::magic::RelativePathBuf;
use figment::Figment;
use proto::client::TlsFiles;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const ENV_PREFIX: &str = "HOST_AGENT_";
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/host-agent";
pub const DEFAULT_INTERVAL_SECS: u64 = 30;
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_BACKOFF_MAX_SECS: u64 = 60;
pub const DEFAULT_UEFI_LOG_PATH: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
pub const DEFAULT_IMA_LOG_PATH: &str = "/sys/kernel/security/ima/ascii_runtime_measurements";
/// Upper bound of every `*_secs` key (one day): larger values are typos.
pub const MAX_SECS: u64 = 86_400;

/// Algorithm of the attestation key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AkType {
    /// RSA-2048, RSASSA-PKCS1-v1_5 with SHA-256.
    #[default]
    Rsa,
    /// NIST P-256, ECDSA with SHA-256.
    Ecc,
}

impl AkType {
    pub fn name(self) -> &'static str {
        match self {
            AkType::Rsa => "rsa",
            AkType::Ecc => "ecc",
        }
    }
}

/// Configuration of the host agent.
///
/// TOML keys (environment: `HOST_AGENT_<KEY>`, nested with `__`, e.g.
/// `HOST_AGENT_TLS__CA`, `HOST_AGENT_INTERVAL_SECS`):
///
/// | key | default | meaning |
/// |-----|---------|---------|
/// | `host` | required | this host's name; must equal the CN of the agent certificate |
/// | `server_url` | required | `https://` base URL of the attestation server |
/// | `tcti` | `device:/dev/tpmrm0` | TPM connection (`device:PATH`, `swtpm:host=H,port=P`, `mssim:…`, `tabrmd:…`) |
/// | `ak_type` | `rsa` | `rsa` (RSA-2048, RSASSA-SHA256) or `ecc` (NIST P-256, ECDSA-SHA256) |
/// | `interval_secs` | 30 | seconds between attestations (1 to 86400, as every `*_secs`) |
/// | `state_dir` | `/var/lib/host-agent` | where the AK blobs (`ak-rsa.pub`/`.priv`, …) are kept across restarts |
/// | `request_timeout_secs` | 10 | timeout of one HTTP request |
/// | `backoff_max_secs` | 60 | cap of the retry delay while the server or TPM is unavailable |
/// | `tls.ca`, `tls.cert`, `tls.key` | required | operator CA bundle, agent certificate and PKCS#8 key (PEM) |
/// | `uefi_log_path` | `/sys/kernel/security/tpm0/binary_bios_measurements` | the UEFI event log, sent when a challenge asks for it |
/// | `ima_log_path` | `/sys/kernel/security/ima/ascii_runtime_measurements` | the IMA list (ascii), sent from the entry a challenge names |
///
/// Relative paths in a config file are resolved against that file's
/// directory; relative paths from the environment against the working
/// directory. Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentConfig {
    pub host: String,
    pub server_url: String,
    pub tcti: String,
    pub ak_type: AkType,
    pub interval_secs: u64,
    pub state_dir: PathBuf,
    pub request_timeout_secs: u64,
    pub backoff_max_secs: u64,
    pub tls: TlsFiles,
    pub uefi_log_path: PathBuf,
    pub ima_log_path: PathBuf,
}

/// The built-in defaults layer (the keys that have a default).
#[derive(Serialize)]
struct Defaults {
    tcti: &'static str,
    ak_type: AkType,
    interval_secs: u64,
    state_dir: &'static str,
    request_timeout_secs: u64,
    backoff_max_secs: u64,
    uefi_log_path: &'static str,
    ima_log_path: &'static str,
}

const DEFAULTS: Defaults = Defaults {
    tcti: DEFAULT_TCTI,
    ak_type: AkType::Rsa,
    interval_secs: DEFAULT_INTERVAL_SECS,
    state_dir: DEFAULT_STATE_DIR,
    request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
    backoff_max_secs: DEFAULT_BACKOFF_MAX_SECS,
    uefi_log_path: DEFAULT_UEFI_LOG_PATH,
    ima_log_path: DEFAULT_IMA_LOG_PATH,
};

/// What the layers are extracted into: paths remember which file set them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Layered {
    host: String,
    server_url: String,
    tcti: String,
    ak_type: AkType,
    interval_secs: u64,
    state_dir: RelativePathBuf,
    request_timeout_secs: u64,
    backoff_max_secs: u64,
    tls: LayeredTls,
    uefi_log_path: RelativePathBuf,
    ima_log_path: RelativePathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayeredTls {
    ca: RelativePathBuf,
    cert: RelativePathBuf,
    key: RelativePathBuf,
}

/// Load and validate the configuration: defaults, then `path` (if any),
/// then the `HOST_AGENT_*` environment.
pub fn load(path: Option<&Path>) -> Result<AgentConfig, Error> {
    let mut figment = Figment::from(Serialized::defaults(DEFAULTS));
    if let Some(path) = path {
        // figment treats a missing file as empty; a named file must exist.
        if let Err(e) = std::fs::metadata(path) {
            return Err(Error::config(
                "config",
                format!("cannot read {}: {e}", path.display()),
            ));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
    from_figment(figment)
}

fn from_figment(figment: Figment) -> Result<AgentConfig, Error> {
    let layered: Layered = figment.extract().map_err(figment_error)?;
    let config = AgentConfig {
        host: layered.host,
        server_url: layered.server_url,
        tcti: layered.tcti,
        ak_type: layered.ak_type,
        interval_secs: layered.interval_secs,
        state_dir: layered.state_dir.relative(),
        request_timeout_secs: layered.request_timeout_secs,
        backoff_max_secs: layered.backoff_max_secs,
        tls: TlsFiles {
            ca: layered.tls.ca.relative(),
            cert: layered.tls.cert.relative(),
            key: layered.tls.key.relative(),
        },
        uefi_log_path: layered.uefi_log_path.relative(),
        ima_log_path: layered.ima_log_path.relative(),
    };
    config.validate()?;
    Ok(config)
}

/// Turn figment's error into one that names the key and where it came from.
fn figment_error(e: figment::Error) -> Error {
    let mut path = e.path.clone();
    // figment's path ends with the offending field for some kinds only.
    let mut name_field = |field: &str| {
        if path.last().map(String::as_str) != Some(field) {
            path.push(field.to_string());
        }
    };
    let problem = match &e.kind {
        Kind::UnknownField(field, expected) => {
            name_field(field);
            format!("unknown key (known keys here: {})", expected.join(", "))
        }
        Kind::MissingField(field) => {
            name_field(field);
            "missing; this key is required".to_string()
        }
        Kind::DuplicateField(field) => {
            name_field(field);
            "given twice".to_string()
        }
        other => other.to_string(),
    };
    let origin = match &e.metadata {
        Some(meta) => match &meta.source {
            Some(source) => format!(" (in {source})"),
            None => format!(" (from {})", meta.name),
        },
        None => String::new(),
    };
    let key = if path.is_empty() {
        "config".to_string()
    } else {
        path.join(".")
    };
    Error::config(key, format!("{problem}{origin}"))
}

impl AgentConfig {
    /// Check the values that deserialized but cannot work.
    pub fn validate(&self) -> Result<(), Error> {
        if !proto::wire::valid_host_name(&self.host) {
            return Err(Error::config(
                "host",
                format!(
                    "{:?} is not a valid host name (letters, digits, '-', '.', '_'; \
                     not starting with '-' or '.')",
                    self.host
                ),
            ));
        }
        let rest = self.server_url.strip_prefix("https://").unwrap_or("");
        if rest.is_empty() {
            return Err(Error::config(
                "server_url",
                format!("{:?} must be an https:// URL", self.server_url),
            ));
        }
        tpm::parse_tcti(&self.tcti)?;
        for (key, value) in [
            ("interval_secs", self.interval_secs),
            ("request_timeout_secs", self.request_timeout_secs),
            ("backoff_max_secs", self.backoff_max_secs),
        ] {
            if !(1..=MAX_SECS).contains(&value) {
                return Err(Error::config(
                    key,
                    format!("{value} is out of range: must be at least 1 and at most {MAX_SECS}"),
                ));
            }
        }
        for (key, path) in [
            ("state_dir", &self.state_dir),
            ("uefi_log_path", &self.uefi_log_path),
            ("ima_log_path", &self.ima_log_path),
        ] {
            if path.as_os_str().is_empty() {
                return Err(Error::config(key, "must not be empty"));
            }
        }
        for (key, file) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if !file.is_file() {
                return Err(Error::config(
                    key,
                    format!("{} is not a readable file", file.display()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// figment's Jail closures must return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const MINIMAL: &str = r#"
        host = "node1"
        server_url = "https://127.0.0.1:8443"
        [tls]
        ca = "ca.pem"
        cert = "node1.pem"
        key = "node1.key"
    "#;

    fn touch_certs(jail: &mut Jail) {
        for f in ["ca.pem", "node1.pem", "node1.key"] {
            jail.create_file(f, "x").unwrap();
        }
    }

    fn config_error(result: Result<AgentConfig, Error>) -> (String, String) {
        match result {
            Err(Error::Config { key, problem }) => (key, problem),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_unset_keys() {
        Jail::expect_with(|jail| {
            touch_certs(jail);
            jail.create_file("agent.toml", MINIMAL)?;
            let cfg = load(Some(Path::new("agent.toml"))).unwrap();
            assert_eq!(cfg.host, "node1");
            assert_eq!(cfg.tcti, DEFAULT_TCTI);
            assert_eq!(cfg.ak_type, AkType::Rsa);
            assert_eq!(cfg.interval_secs, 30);
            assert_eq!(cfg.request_timeout_secs, 10);
            assert_eq!(cfg.backoff_max_secs, 60);
            assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
            assert_eq!(cfg.uefi_log_path, PathBuf::from(DEFAULT_UEFI_LOG_PATH));
            assert_eq!(cfg.ima_log_path, PathBuf::from(DEFAULT_IMA_LOG_PATH));
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_file() {
        Jail::expect_with(|jail| {
            touch_certs(jail);
            jail.create_file("other-ca.pem", "x")?;
            jail.create_file(
                "agent.toml",
                &format!("{MINIMAL}\n"), // interval not set in file
            )?;
            jail.set_env("HOST_AGENT_INTERVAL_SECS", "5");
            jail.set_env("HOST_AGENT_AK_TYPE", "ecc");
            jail.set_env("HOST_AGENT_TCTI", "swtpm:host=127.0.0.1,port=2321");
            jail.set_env("HOST_AGENT_TLS__CA", "other-ca.pem");
            jail.set_env("HOST_AGENT_IMA_LOG_PATH", "ima.txt");
            let cfg = load(Some(Path::new("agent.toml"))).unwrap();
            assert_eq!(cfg.ima_log_path, PathBuf::from("ima.txt"));
            assert_eq!(cfg.interval_secs, 5);
            assert_eq!(cfg.ak_type, AkType::Ecc);
            assert_eq!(cfg.tcti, "swtpm:host=127.0.0.1,port=2321");
            // From the environment: relative to the working directory.
            assert_eq!(cfg.tls.ca, PathBuf::from("other-ca.pem"));
            Ok(())
        });
    }

    #[test]
    fn file_overrides_defaults_and_env_alone_suffices() {
        Jail::expect_with(|jail| {
            touch_certs(jail);
            jail.set_env("HOST_AGENT_HOST", "node7");
            jail.set_env("HOST_AGENT_SERVER_URL", "https://server:8443");
            jail.set_env("HOST_AGENT_TLS__CA", "ca.pem");
            jail.set_env("HOST_AGENT_TLS__CERT", "node1.pem");
            jail.set_env("HOST_AGENT_TLS__KEY", "node1.key");
            let cfg = load(None).unwrap();
            assert_eq!(cfg.host, "node7");
            assert_eq!(cfg.interval_secs, DEFAULT_INTERVAL_SECS);

            jail.create_file("agent.toml", &format!("interval_secs = 12\n{MINIMAL}"))?;
            let cfg = load(Some(Path::new("agent.toml"))).unwrap();
            assert_eq!(cfg.interval_secs, 12);
            // The environment still wins over the file for the host.
            assert_eq!(cfg.host, "node7");
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        Jail::expect_with(|jail| {
            touch_certs(jail);
            jail.create_file("agent.toml", &format!("intervall_secs = 3\n{MINIMAL}"))?;
            let (key, problem) = config_error(load(Some(Path::new("agent.toml"))));
            assert_eq!(key, "intervall_secs");
            assert!(problem.contains("unknown key"), "{problem}");
            assert!(problem.contains("agent.toml"), "{problem}");

            jail.create_file("nested.toml", &format!("{MINIMAL}\npassword = \"x\"\n"))?;
            let (key, _) = config_error(load(Some(Path::new("nested.toml"))));
            assert_eq!(key, "tls.password");

            jail.create_file("agent2.toml", MINIMAL)?;
            jail.set_env("HOST_AGENT_COLOUR", "blue");
            let (key, problem) = config_error(load(Some(Path::new("agent2.toml"))));
            assert_eq!(key, "colour");
            assert!(problem.contains("environment"), "{problem}");
            Ok(())
        });
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        Jail::expect_with(|jail| {
            std::fs::create_dir("conf").unwrap();
            for f in ["conf/ca.pem", "conf/node1.pem", "conf/node1.key"] {
                jail.create_file(f, "x")?;
            }
            jail.create_file(
                "conf/agent.toml",
                &format!("state_dir = \"state\"\n{MINIMAL}"),
            )?;
            let cfg = load(Some(Path::new("conf/agent.toml"))).unwrap();
            assert_eq!(cfg.tls.ca, PathBuf::from("conf/ca.pem"));
            assert_eq!(cfg.tls.cert, PathBuf::from("conf/node1.pem"));
            assert_eq!(cfg.tls.key, PathBuf::from("conf/node1.key"));
            assert_eq!(cfg.state_dir, PathBuf::from("conf/state"));

            // Absolute paths stay as they are.
            let abs = jail.directory().join("conf/ca.pem");
            jail.create_file(
                "conf/abs.toml",
                &MINIMAL.replace("\"ca.pem\"", &format!("{:?}", abs.display().to_string())),
            )?;
            let cfg = load(Some(Path::new("conf/abs.toml"))).unwrap();
            assert_eq!(cfg.tls.ca, abs);
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_the_key() {
        Jail::expect_with(|jail| {
            touch_certs(jail);
            let cases: &[(&str, &str, &str)] = &[
                ("host = \"../etc\"", "host", "valid host name"),
                (
                    "server_url = \"http://127.0.0.1:8443\"",
                    "server_url",
                    "https://",
                ),
                ("interval_secs = 0", "interval_secs", "at least 1"),
                ("backoff_max_secs = 0", "backoff_max_secs", "at least 1"),
                (
                    "request_timeout_secs = 100000",
                    "request_timeout_secs",
                    "at most 86400",
                ),
                ("ak_type = \"dsa\"", "ak_type", "dsa"),
                ("tcti = \"carrier-pigeon\"", "tcti", "carrier-pigeon"),
                ("interval_secs = \"soon\"", "interval_secs", "soon"),
            ];
            for (i, (line, want_key, want_problem)) in cases.iter().enumerate() {
                let key = line.split(' ').next().unwrap();
                // Put the override first; drop the line it replaces.
                let body: String = MINIMAL
                    .lines()
                    .filter(|l| l.trim_start().split(' ').next() != Some(key))
                    .collect::<Vec<_>>()
                    .join("\n");
                let name = format!("case{i}.toml");
                jail.create_file(&name, &format!("{line}\n{body}"))?;
                let (got_key, problem) = config_error(load(Some(Path::new(&name))));
                assert_eq!(&got_key, want_key, "{line}: {problem}");
                assert!(problem.contains(want_problem), "{line}: {problem}");
            }

            jail.create_file("nohost.toml", &MINIMAL.replace("host = \"node1\"", ""))?;
            let (key, problem) = config_error(load(Some(Path::new("nohost.toml"))));
            assert_eq!(key, "host");
            assert!(problem.contains("required"), "{problem}");

            jail.create_file("nokey.toml", &MINIMAL.replace("node1.key", "missing.key"))?;
            let (key, problem) = config_error(load(Some(Path::new("nokey.toml"))));
            assert_eq!(key, "tls.key");
            assert!(problem.contains("missing.key"), "{problem}");

            let (key, _) = config_error(load(Some(Path::new("does-not-exist.toml"))));
            assert_eq!(key, "config");
            Ok(())
        });
    }
}
