//! `attestctl` parts of the audit trail: `init --amqp-url`, `audit export`
//! and `audit verify` (both local: they need no running server).

use super::chain::{self, ExportRecord};
use crate::ctl::{AuditCommand, CtlError, InitArgs, InitSummary};
use crate::error::Error;
use crate::store::Store;
use std::io::Write;
use std::path::Path;

/// `attestctl init` flags of the audit trail.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuditInitArgs {
    /// Also publish audit events to RabbitMQ (AMQP 0-9-1, OpenStack
    /// notification format), e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long)]
    pub amqp_url: Option<String>,
}

/// Refuse bad flags before `init` writes anything.
pub fn check(args: &AuditInitArgs) -> Result<(), Error> {
    if let Some(url) = &args.amqp_url {
        if !url.starts_with("amqp://")
            || url.contains(['"', '\\'])
            || url.chars().any(char::is_control)
        {
            return Err(Error::Config {
                key: "--amqp-url".into(),
                problem: "must be an amqp:// URL without quotes or backslashes".into(),
            });
        }
    }
    Ok(())
}

/// Append the `[audit]` section to the server configuration `init` wrote.
pub fn init(_pool: &InitArgs, args: &AuditInitArgs, summary: &InitSummary) -> Result<(), Error> {
    let mut section = String::from(
        "\n# Audit trail (docs/audit.md): checkpoints of the event hash chain are\n\
         # signed with token_key; events are pruned after retention_days (0: never)\n\
         # and only once every sink received them.\n\
         [audit]\n\
         retention_days = 0\n\
         checkpoint_every = 1000\n\
         checkpoint_secs = 60\n",
    );
    check(args)?;
    if let Some(url) = &args.amqp_url {
        section.push_str(&format!(
            "\n# OpenStack notifications (oslo.messaging messagingv2) on RabbitMQ.\n\
             [audit.amqp]\n\
             url = \"{url}\"\n\
             exchange = \"openstack\"\n\
             routing_key = \"notifications.info\"\n"
        ));
    }
    let path = &summary.server_config;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(section.as_bytes()).map_err(io)
}

/// The local verbs; `None` for those that call the server.
pub async fn run_local(cmd: &AuditCommand) -> Result<Option<serde_json::Value>, CtlError> {
    match cmd {
        AuditCommand::Status => Ok(None),
        AuditCommand::Export { server_config, out } => {
            let cfg = crate::config::ServerConfig::load(Some(server_config))?;
            let store = crate::store::open(&cfg.database_url.0)
                .await
                .map_err(Error::from)?;
            let (events, checkpoints) = export(store.as_ref(), out).await?;
            Ok(Some(serde_json::json!({
                "file": out,
                "events": events,
                "checkpoints": checkpoints,
            })))
        }
        AuditCommand::Verify { file, public_key } => {
            let text = read(file)?;
            let key = match public_key {
                Some(p) => Some(load_public_key(p)?),
                None => None,
            };
            let report = chain::verify(&text, key.as_deref());
            match report.problem {
                Some(problem) => Err(CtlError::AuditVerify { problem }),
                None => Ok(Some(serde_json::to_value(&report).unwrap_or_default())),
            }
        }
    }
}

fn read(path: &Path) -> Result<String, CtlError> {
    std::fs::read_to_string(path).map_err(|e| CtlError::Input {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// A PUBLIC KEY PEM, or the PKCS#8 private key whose public half is meant.
fn load_public_key(path: &Path) -> Result<Vec<u8>, CtlError> {
    let text = read(path)?;
    if let Ok(k) = chain::public_key_from_pem(&text) {
        return Ok(k);
    }
    let key = chain::SigningKey::load(path).map_err(|e| CtlError::Input {
        path: path.display().to_string(),
        detail: format!("neither a P-256 PUBLIC KEY nor a PKCS#8 key: {e}"),
    })?;
    hex::decode(key.public_key_hex()).map_err(|e| CtlError::Input {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Write every event (oldest first) and then every checkpoint to `out`.
pub async fn export(store: &dyn Store, out: &Path) -> Result<(usize, usize), Error> {
    let io = |source| Error::Io {
        path: out.display().to_string(),
        source,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(io)?);
    let mut after = 0;
    let mut events = 0;
    loop {
        let batch = store.stored_events_after(after, 1000).await?;
        let Some(last) = batch.last() else { break };
        after = last.seq;
        for e in &batch {
            let line = serde_json::to_string(&ExportRecord::event(e)).unwrap_or_default();
            writeln!(f, "{line}").map_err(io)?;
        }
        events += batch.len();
    }
    let checkpoints = store.checkpoints().await?;
    for c in &checkpoints {
        let line = serde_json::to_string(&ExportRecord::Checkpoint(c.clone())).unwrap_or_default();
        writeln!(f, "{line}").map_err(io)?;
    }
    f.flush().map_err(io)?;
    Ok((events, checkpoints.len()))
}
