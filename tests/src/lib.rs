//! A local trusted pool for end-to-end tests: a development PKI written by
//! `attestctl init`, the attestation server in-process on a port-0 listener
//! (SQLite in a temporary directory), and helpers to reach it with each
//! role's certificate. TPMs are real swtpm instances from `test-support`.

use anyhow::{Context, Result};
use attestation_server::config::ServerConfig;
use attestation_server::ctl::{self, InitArgs};
use attestation_server::AppState;
use proto::client::{ApiClient, TlsFiles};
use proto::wire::HostTrust;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// A host agent running in this process until [`Agent::stop`].
pub struct Agent {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), host_agent::Error>>,
}

impl Agent {
    pub fn spawn(config: host_agent::AgentConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(host_agent::run(config, async {
            let _ = stopped.await;
        }));
        Agent { stop, task }
    }

    /// Stop it; an error it ended with is the test's.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

pub struct Pool {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Pool {
    /// Write a pool for `hosts` (with their TCTIs) and start its server.
    /// `tune` may adjust the server configuration before it starts.
    pub async fn start(
        hosts: &[(&str, String)],
        interval: u64,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> Result<Pool> {
        let dir = tempfile::tempdir()?;
        ctl::init(&InitArgs {
            out: dir.path().to_path_buf(),
            // Rewritten below: the server binds port 0.
            server_port: 1,
            hosts: hosts.iter().map(|(h, _)| h.to_string()).collect(),
            tctis: hosts.iter().map(|(_, t)| t.clone()).collect(),
            interval,
            force: false,
            ek_cas: vec![],
        })?;
        let mut config = ServerConfig::load(Some(&dir.path().join("server.toml")))?;
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        config.listen = listener.local_addr()?;
        let state = AppState::new(config).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let st = state.clone();
        let server = tokio::spawn(async move {
            let _ = attestation_server::serve(listener, st, async {
                let _ = stopped.await;
            })
            .await;
        });
        Ok(Pool {
            dir,
            url,
            state,
            stop: Some(stop),
            server: Some(server),
        })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.path("ca.pem"),
            cert: self.path(&format!("{name}.pem")),
            key: self.path(&format!("{name}.key")),
        }
    }

    /// An API client with the certificate `name` (`admin`, `scheduler`, `agent-HOST`).
    pub fn client(&self, name: &str) -> Result<ApiClient> {
        Ok(ApiClient::new(
            &self.url,
            &self.files(name),
            Duration::from_secs(10),
        )?)
    }

    /// Start the agent of `host` with its default configuration.
    pub fn spawn_agent(&self, host: &str) -> Result<Agent> {
        Ok(Agent::spawn(self.agent_config(host)?))
    }

    /// The agent configuration `attestctl init` wrote, pointed at this server.
    pub fn agent_config(&self, host: &str) -> Result<host_agent::AgentConfig> {
        let mut c = host_agent::config::load(Some(&self.path(&format!("agent-{host}.toml"))))?;
        c.server_url = self.url.clone();
        Ok(c)
    }

    /// Run `attestctl ARGS` (split at whitespace) as the admin, against
    /// this server; its JSON output or its error.
    pub async fn attestctl(&self, args: &str) -> Result<serde_json::Value, ctl::CtlError> {
        use clap::Parser;
        let config = self.path("admin-test.toml");
        let written = std::fs::write(
            &config,
            format!(
                "server_url = \"{}\"\n[tls]\nca = \"ca.pem\"\ncert = \"admin.pem\"\nkey = \"admin.key\"\n",
                self.url
            ),
        );
        written.map_err(|e| ctl::CtlError::Input {
            path: config.display().to_string(),
            detail: e.to_string(),
        })?;
        let config = config.display().to_string();
        let argv = ["attestctl", "--config", &config]
            .into_iter()
            .map(str::to_string)
            .chain(args.split_whitespace().map(str::to_string));
        let cli = ctl::Cli::try_parse_from(argv).map_err(|e| ctl::CtlError::Input {
            path: "argv".into(),
            detail: e.to_string(),
        })?;
        ctl::run(cli).await
    }

    pub async fn trust(&self, host: &str) -> Result<HostTrust> {
        Ok(self
            .client("admin")?
            .get(&format!("/v1/hosts/{host}/trust"))
            .await?)
    }

    /// Poll the host's verdict until `pred` holds (bounded wait).
    pub async fn wait_for(
        &self,
        host: &str,
        what: &str,
        pred: impl Fn(&HostTrust) -> bool,
    ) -> Result<HostTrust> {
        let mut last = None;
        for _ in 0..600 {
            if let Ok(t) = self.trust(host).await {
                if pred(&t) {
                    return Ok(t);
                }
                last = Some(t);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("host {host} never reached: {what}; last verdict {last:?}")
    }

    /// Every audit event in the JSON-lines file, once the deliverer caught up.
    pub async fn audit_events(&self) -> Result<Vec<serde_json::Value>> {
        let path = self.path("audit.jsonl");
        let stored = self.state.store.events_after(0, i64::MAX).await?.len();
        for _ in 0..100 {
            let lines = read_lines(&path).unwrap_or_default();
            if lines.len() >= stored {
                return lines
                    .iter()
                    .map(|l| serde_json::from_str(l).context("audit line is not JSON"))
                    .collect();
            }
            self.state.audit_wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("audit file never caught up with {stored} stored events")
    }

    /// Stop the server and export every event it stored to
    /// `target/cadf-samples/NAME.jsonl`, where `scripts/test.sh` loads each
    /// one with pycadf (the CADF conformance check).
    pub async fn stop_and_dump_cadf(self, name: &str) -> Result<()> {
        let store = self.state.store.clone();
        self.stop().await;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let dir = target.join("cadf-samples");
        std::fs::create_dir_all(&dir)?;
        attestation_server::audit::ctl::export(store.as_ref(), &dir.join(format!("{name}.jsonl")))
            .await?;
        Ok(())
    }

    /// Kill the server abruptly (its task aborted mid-request, as a crash
    /// would), keeping the pool's files for other servers and agents.
    pub async fn kill_server(&mut self) {
        self.stop.take();
        if let Some(h) = self.server.take() {
            h.abort();
            let _ = h.await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = h.await;
        }
    }
}

/// The complete lines of a file another task may be appending to: a last
/// line without its newline is still being written and is left out.
fn read_lines(path: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    Some(complete.lines().map(str::to_string).collect())
}

/// Events about `host` that are attestations, in order.
pub fn attestations<'a>(events: &'a [serde_json::Value], host: &str) -> Vec<&'a serde_json::Value> {
    events
        .iter()
        .filter(|e| e["action"] == "evaluate" && e["target"]["name"] == host)
        .collect()
}

// ---- Scheduler integration helpers (issue 6) ----

/// A loopback port that was free a moment ago (for listeners the server binds itself).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Pool {
    /// Register `host` and store a verdict for it directly, as if it had attested.
    pub async fn store_verdict(
        &self,
        host: &str,
        trust: proto::wire::Trust,
        verified_at: chrono::DateTime<chrono::Utc>,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<HostTrust> {
        let store = &self.state.store;
        store.register_host(host, verified_at).await?;
        let verdict = HostTrust {
            host: host.to_string(),
            trust,
            verified_at: Some(verified_at),
            expires_at: Some(expires_at),
            reasons: Vec::new(),
            policy: None,
        };
        let rec = attestation_server::store::AttestationRecord::verdict_only(&verdict);
        store.record_attestation(host, rec).await?;
        Ok(verdict)
    }

    /// A plain HTTP client over mutual TLS with the certificate `name`
    /// (for methods and bodies the JSON `ApiClient` does not cover).
    pub fn http(&self, name: &str) -> Result<reqwest::Client> {
        let tls = proto::client::rustls_config(&self.files(name))?;
        Ok(reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(10))
            .build()?)
    }
}
