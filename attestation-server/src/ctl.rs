//! `attestctl`: the admin CLI. `init` writes a development pool (PKI and
//! config files); the other verbs call the admin API with the admin
//! certificate named in `admin.toml` and print JSON.

use crate::config::config_error;
use crate::error::Error;
use crate::pki::{self, Ca};
use clap::{Parser, Subcommand};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use proto::client::{ApiClient, TlsFiles};
use proto::wire::{HostDetail, HostTrust, RegisterHost, TrustQuery, TrustQueryResponse};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod challenge_key;
pub mod check;
pub mod eventlog;
pub mod ima;
pub mod whitelist;

#[derive(Debug, Parser)]
#[command(
    name = "attestctl",
    about = "Administer a trusted compute pool's attestation server"
)]
pub struct Cli {
    /// The admin client configuration (written by `attestctl init` as admin.toml).
    #[arg(long, global = true, env = "ATTESTCTL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a development PKI and ready-to-run config files.
    Init(InitCommand),
    /// Register, show and inspect hosts.
    #[command(subcommand)]
    Host(HostCommand),
    /// Versioned whitelists: list, import/export, golden host, diff, dry-run.
    #[command(subcommand)]
    Whitelist(whitelist::WhitelistCommand),
    /// Host groups: which whitelists judge which hosts.
    #[command(subcommand)]
    Group(whitelist::GroupCommand),
    /// Print the current verdict of each host.
    Trust { hosts: Vec<String> },
    /// The audit trail: delivery status, export, tamper check.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Nagios/Icinga plugin: one status line with perfdata; exits 0 OK,
    /// 1 WARNING, 2 CRITICAL, 3 UNKNOWN (server unreachable).
    Check(check::CheckArgs),
    /// IMA runtime measurement lists: offline verification.
    #[command(subcommand)]
    Ima(ima::ImaCommand),
    /// The pool's challenge key: rotate it (reads the server's database).
    #[command(subcommand)]
    ChallengeKey(challenge_key::ChallengeKeyCommand),
    /// Load testing: a fleet of virtual hosts (software TPM keys) that
    /// enroll and attest through the real protocol; prints a JSON summary.
    Simulate(crate::simulate::SimulateArgs),
    /// Local: replay a UEFI event log (binary_bios_measurements).
    #[command(subcommand)]
    Eventlog(eventlog::EventlogCommand),
    /// Local: boot reference policies.
    #[command(subcommand)]
    Policy(eventlog::PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Delivery lag and backlog of each audit sink, the chain head and the
    /// last signed checkpoint (calls the server with admin.toml).
    Status,
    /// Write every stored event (with its chain links) and every signed
    /// checkpoint as JSON lines; reads the server's database directly.
    Export {
        /// The server's configuration (for its database URL).
        #[arg(long)]
        server_config: PathBuf,
        /// Where to write the JSON lines.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an exported log: exits 1 naming the first event that was
    /// altered, removed or reordered, or a checkpoint that does not verify.
    Verify {
        file: PathBuf,
        /// The server's checkpoint key: a PUBLIC KEY PEM, or the PKCS#8
        /// private key (token_key / audit.key) itself.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Register a host before its agent first enrolls.
    Register { host: String },
    /// Print everything the server knows of a host, with its verdict.
    Show { host: String },
    /// Print the host's audit events (oldest first).
    Events { host: String },
    /// Approve one enrollment of the host with a different EK (a TPM or
    /// motherboard replacement); until then such an enrollment is refused.
    Rekey { host: String },
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Port of the server on 127.0.0.1.
    #[arg(long)]
    pub server_port: u16,
    /// A host of the pool (repeat for several).
    #[arg(long = "host", required = true)]
    pub hosts: Vec<String>,
    /// TPM TCTI of each host, in the order of --host (default device:/dev/tpmrm0).
    #[arg(long = "tcti")]
    pub tctis: Vec<String>,
    /// Seconds between attestations of each agent.
    #[arg(long, default_value_t = 30)]
    pub interval: u64,
    /// Overwrite an existing pool in --out.
    #[arg(long)]
    pub force: bool,
    /// A TPM manufacturer CA certificate (PEM or DER) that EK certificates
    /// must chain to; repeat for roots and intermediates.
    #[arg(long = "ek-ca")]
    pub ek_cas: Vec<PathBuf>,
}

/// `attestctl init`'s flags: the pool, and optional integrations.
#[derive(Debug, clap::Args)]
pub struct InitCommand {
    #[command(flatten)]
    pub pool: InitArgs,
    #[command(flatten)]
    pub extras: InitExtras,
    #[command(flatten)]
    pub audit: crate::audit::ctl::AuditInitArgs,
}

/// Flags of `init` beyond the pool itself.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InitExtras {
    /// Serve OpenStack Nova's PollHosts (OpenAttestation API) on 127.0.0.1:PORT.
    #[arg(long, requires = "oat_blob")]
    pub oat_port: Option<u16>,
    /// The shared secret Nova sends as x-auth-blob (nova.conf attestation_auth_blob).
    #[arg(long, requires = "oat_port")]
    pub oat_blob: Option<String>,
}

/// `admin.toml`: where the server is and which admin certificate to use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    pub server_url: String,
    pub tls: TlsFiles,
    #[serde(default = "default_timeout")]
    pub request_timeout_secs: u64,
}

fn default_timeout() -> u64 {
    10
}

impl CtlConfig {
    /// File then environment (`ATTESTCTL_` prefix, `__` for nesting).
    pub fn load(file: &Path) -> Result<Self, Error> {
        if !file.exists() {
            return Err(Error::Config {
                key: "--config".into(),
                problem: format!("file {} does not exist", file.display()),
            });
        }
        let mut cfg: CtlConfig = Figment::new()
            .merge(Toml::file(file))
            .merge(Env::prefixed("ATTESTCTL_").split("__").ignore(&["config"]))
            .extract()
            .map_err(config_error)?;
        if let Some(base) = file.parent() {
            for p in [&mut cfg.tls.ca, &mut cfg.tls.cert, &mut cfg.tls.key] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        let urls = proto::client::server_urls(&cfg.server_url);
        if urls.is_empty() || !urls.iter().all(|u| u.starts_with("https://")) {
            return Err(Error::Config {
                key: "server_url".into(),
                problem: "must be an https:// URL, or several separated by commas".into(),
            });
        }
        Ok(cfg)
    }

    pub fn client(&self) -> Result<ApiClient, Error> {
        ApiClient::new(
            &self.server_url,
            &self.tls,
            Duration::from_secs(self.request_timeout_secs),
        )
        .map_err(|e| Error::TlsSetup(e.to_string()))
    }
}

/// What `init` wrote.
#[derive(Debug, Serialize)]
pub struct InitSummary {
    pub dir: PathBuf,
    pub server_config: PathBuf,
    pub agent_configs: Vec<PathBuf>,
    pub scheduler_config: PathBuf,
    pub admin_config: PathBuf,
}

pub fn init(args: &InitArgs) -> Result<InitSummary, Error> {
    init_with(args, &InitExtras::default())
}

/// `init` with the optional integrations switched on.
pub fn init_with(args: &InitArgs, extras: &InitExtras) -> Result<InitSummary, Error> {
    let bad = |key: &str, problem: String| Error::Config {
        key: key.into(),
        problem,
    };
    for h in &args.hosts {
        if !proto::wire::valid_host_name(h) {
            return Err(bad("--host", format!("{h:?} is not a valid host name")));
        }
    }
    if !args.tctis.is_empty() && args.tctis.len() != args.hosts.len() {
        return Err(bad(
            "--tcti",
            format!(
                "{} given for {} hosts: give one per --host, in order",
                args.tctis.len(),
                args.hosts.len()
            ),
        ));
    }
    if args.interval == 0 {
        return Err(bad("--interval", "must be at least 1 second".into()));
    }
    if args.server_port == 0 {
        return Err(bad("--server-port", "must be a fixed port".into()));
    }
    let oat = match (extras.oat_port, extras.oat_blob.as_deref()) {
        (Some(0), _) => return Err(bad("--oat-port", "must be a fixed port".into())),
        (Some(p), _) if p == args.server_port => {
            return Err(bad("--oat-port", "must differ from --server-port".into()))
        }
        (Some(_), Some(b))
            if b.is_empty() || b.contains(['"', '\\']) || b.chars().any(char::is_control) =>
        {
            return Err(bad(
                "--oat-blob",
                "must be non-empty, without quotes, backslashes or control characters".into(),
            ))
        }
        (Some(p), Some(b)) => format!(
            "\n# OpenStack Nova TrustedFilter (OpenAttestation PollHosts); see docs/nova.md.\n\
             [oat]\n\
             listen = \"127.0.0.1:{p}\"\n\
             api_url = \"/OpenAttestationWebServices/V1.0\"\n\
             auth_blob = \"{b}\"\n\
             max_hosts = 1000\n"
        ),
        _ => String::new(),
    };
    for ca in &args.ek_cas {
        if !ca.is_file() {
            return Err(bad("--ek-ca", format!("{} is not a file", ca.display())));
        }
    }
    let dir = &args.out;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let server_config = dir.join("server.toml");
    if server_config.exists() && !args.force {
        return Err(bad(
            "--out",
            format!(
                "{} already holds a pool; pass --force to overwrite it",
                dir.display()
            ),
        ));
    }

    let (ca, ca_pem) = Ca::new("trusted compute pool development CA")?;
    pki::write(&dir.join("ca.pem"), &ca_pem, false)?;
    pki::write(&dir.join("ca.key"), &ca.key_pem(), true)?;
    ca.issue_server("attestation-server")?
        .write(dir, "server")?;
    ca.issue_client("scheduler", "scheduler")?
        .write(dir, "scheduler")?;
    ca.issue_client("admin", "admin")?.write(dir, "admin")?;
    // Reads the audit trail only (GET /v1/events, /v1/audit/status).
    ca.issue_client("auditor", "auditor")?
        .write(dir, "auditor")?;
    pki::write(
        &dir.join("token-signing.key"),
        &crate::token::generate_key_pem()?,
        true,
    )?;

    let url = format!("https://127.0.0.1:{}", args.server_port);
    // A verdict outlives a few missed rounds, not more.
    let freshness = args.interval.saturating_mul(3).max(10);
    let ek_ca = args
        .ek_cas
        .iter()
        .map(|p| {
            let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            format!("{:?}", abs.display().to_string())
        })
        .collect::<Vec<_>>()
        .join(", ");
    let server = format!(
        "# Attestation server (written by attestctl init). Every key can be overridden\n\
         # by an ATTEST_SERVER_* environment variable, e.g. ATTEST_SERVER_LISTEN.\n\
         name = \"attestation-server\"\n\
         listen = \"127.0.0.1:{port}\"\n\
         database_url = \"sqlite://attest.db\"\n\
         audit_file = \"audit.jsonl\"\n\
         freshness_secs = {freshness}\n\
         challenge_ttl_secs = 60\n\
         max_body_bytes = 65536\n\n\
         # TPM manufacturer CAs that EK certificates must chain to.\n\
         ek_ca = [{ek_ca}]\n\
         # Hosts whose TPM may enroll without an EK certificate (audited).\n\
         allow_without_ek_certificate = []\n\
         enrollment_ttl_secs = 300\n\n\
         # ES256 key that signs host-trust tokens (GET /v1/hosts/HOST/token) and\n\
         # trust-change notifications; its public half is at /.well-known/jwks.json.\n\
         token_key = \"token-signing.key\"\n\
         token_ttl_secs = 300\n\
         # CA bundle for subscribers' HTTPS certificates (default: tls.client_ca).\n\
         # push_ca = \"subscribers-ca.pem\"\n\n\
         [pcr_selection]\n\
         sha256 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n\n\
         [tls]\n\
         cert = \"server.pem\"\n\
         key = \"server.key\"\n\
         client_ca = \"ca.pem\"\n",
        port = args.server_port
    );
    let server = format!("{server}{oat}");
    pki::write(&server_config, &server, false)?;

    let client_toml = |name: &str| {
        format!("server_url = \"{url}\"\n\n[tls]\nca = \"ca.pem\"\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\n")
    };
    let mut agent_configs = Vec::new();
    for (i, host) in args.hosts.iter().enumerate() {
        let name = format!("agent-{host}");
        ca.issue_client("agent", host)?.write(dir, &name)?;
        let tcti = args
            .tctis
            .get(i)
            .map_or("device:/dev/tpmrm0", String::as_str);
        let agent = format!(
            "# Host agent of {host} (written by attestctl init); HOST_AGENT_* variables override.\n\
             host = \"{host}\"\n\
             tcti = \"{tcti}\"\n\
             interval_secs = {interval}\n\
             state_dir = \"state-{host}\"\n\
             {client}",
            interval = args.interval,
            client = client_toml(&name)
        );
        let path = dir.join(format!("{name}.toml"));
        pki::write(&path, &agent, false)?;
        agent_configs.push(path);
    }
    let scheduler_config = dir.join("scheduler.toml");
    pki::write(&scheduler_config, &client_toml("scheduler"), false)?;
    let admin_config = dir.join("admin.toml");
    pki::write(&admin_config, &client_toml("admin"), false)?;
    pki::write(&dir.join("auditor.toml"), &client_toml("auditor"), false)?;
    Ok(InitSummary {
        dir: dir.clone(),
        server_config,
        agent_configs,
        scheduler_config,
        admin_config,
    })
}

/// Errors of the CLI verbs.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Local(#[from] Error),
    #[error(transparent)]
    Client(#[from] proto::client::ClientError),
    #[error("cannot read {path}: {detail}")]
    Input { path: String, detail: String },
    #[error("audit log check failed: {problem}")]
    AuditVerify { problem: String },
}

/// Run one verb; the answer is printed as JSON by the binary.
pub async fn run(cli: Cli) -> Result<serde_json::Value, CtlError> {
    if let Command::Init(cmd) = &cli.command {
        crate::audit::ctl::check(&cmd.audit)?;
        let summary = init_with(&cmd.pool, &cmd.extras)?;
        crate::audit::ctl::init(&cmd.pool, &cmd.audit, &summary)?;
        return Ok(serde_json::to_value(summary).unwrap_or_default());
    }
    if let Command::Eventlog(cmd) = &cli.command {
        return eventlog::run_eventlog(cmd);
    }
    if let Command::Policy(cmd) = &cli.command {
        return eventlog::run_policy(cmd);
    }
    if let Command::Simulate(args) = &cli.command {
        return Ok(crate::simulate::run_json(args).await?);
    }
    if let Command::Ima(cmd) = &cli.command {
        return ima::run(cmd);
    }
    if let Command::Check(args) = &cli.command {
        // The binary prints the line and exits with the plugin code itself;
        // as JSON, the same report.
        let r = check::run(cli.config.as_deref(), args).await;
        return Ok(serde_json::json!({"state": r.state.label(), "line": r.line}));
    }
    if let Command::ChallengeKey(cmd) = &cli.command {
        return challenge_key::run(cmd).await;
    }
    if let Command::Audit(cmd) = &cli.command {
        if let Some(answer) = crate::audit::ctl::run_local(cmd).await? {
            return Ok(answer);
        }
    }
    let path = cli.config.clone().ok_or_else(|| Error::Config {
        key: "--config".into(),
        problem: "is required (the admin.toml written by attestctl init)".into(),
    })?;
    let api = CtlConfig::load(&path)?.client()?;
    let value = match cli.command {
        Command::Init(_) | Command::Check(_) | Command::Simulate(_) => serde_json::Value::Null,
        Command::ChallengeKey(_) => serde_json::Value::Null,
        Command::Ima(_) => serde_json::Value::Null,
        Command::Eventlog(_) | Command::Policy(_) => serde_json::Value::Null,
        Command::Audit(_) => api.get::<serde_json::Value>("/v1/audit/status").await?,
        Command::Host(HostCommand::Register { host }) => to_json(
            api.post::<_, HostDetail>("/v1/hosts", &RegisterHost { host })
                .await?,
        ),
        Command::Host(HostCommand::Show { host }) => {
            to_json(api.get::<HostDetail>(&format!("/v1/hosts/{host}")).await?)
        }
        Command::Host(HostCommand::Rekey { host }) => to_json(
            api.post::<_, HostDetail>(&format!("/v1/hosts/{host}/rekey"), &serde_json::json!({}))
                .await?,
        ),
        Command::Host(HostCommand::Events { host }) => {
            api.get::<serde_json::Value>(&format!("/v1/hosts/{host}/events"))
                .await?
        }
        Command::Whitelist(cmd) => whitelist::run_whitelist(&api, cmd).await?,
        Command::Group(cmd) => whitelist::run_group(&api, cmd).await?,
        Command::Trust { hosts } => {
            let answer: TrustQueryResponse =
                api.post("/v1/trust/query", &TrustQuery { hosts }).await?;
            to_json::<Vec<HostTrust>>(answer.hosts)
        }
    };
    Ok(value)
}

fn to_json<T: Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    #[test]
    fn init_writes_configs_that_parse() {
        let dir = tempfile::tempdir().unwrap();
        let args = InitArgs {
            out: dir.path().join("pool"),
            server_port: 18443,
            hosts: vec!["node1".into(), "node2".into()],
            tctis: vec!["swtpm:port=1".into(), "swtpm:port=3".into()],
            interval: 5,
            force: false,
            ek_cas: vec![],
        };
        let s = init(&args).unwrap();
        let server = ServerConfig::load(Some(&s.server_config)).unwrap();
        assert_eq!(server.listen.port(), 18443);
        assert_eq!(server.freshness_secs, 15);
        assert!(server.tls.cert.starts_with(dir.path()));
        let admin = CtlConfig::load(&s.admin_config).unwrap();
        assert_eq!(admin.server_url, "https://127.0.0.1:18443");
        admin.client().unwrap();
        CtlConfig::load(&s.scheduler_config)
            .unwrap()
            .client()
            .unwrap();
        let agent2 = std::fs::read_to_string(&s.agent_configs[1]).unwrap();
        assert!(agent2.contains("tcti = \"swtpm:port=3\""));
        // The agent certificate names its host and role.
        let pem = std::fs::read(args.out.join("agent-node2.pem")).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        let id = crate::tls::identity(&der).unwrap();
        assert_eq!(
            (id.role, id.name.as_str()),
            (crate::tls::Role::Agent, "node2")
        );
        // A second init into the same directory needs --force.
        assert!(matches!(init(&args), Err(Error::Config { key, .. }) if key == "--out"));
    }

    #[test]
    fn init_refuses_mismatched_tctis() {
        let dir = tempfile::tempdir().unwrap();
        let args = InitArgs {
            out: dir.path().into(),
            server_port: 1,
            hosts: vec!["a".into(), "b".into()],
            tctis: vec!["x".into()],
            interval: 5,
            force: false,
            ek_cas: vec![],
        };
        assert!(matches!(init(&args), Err(Error::Config { key, .. }) if key == "--tcti"));
    }

    use rustls_pki_types::pem::PemObject;
}
