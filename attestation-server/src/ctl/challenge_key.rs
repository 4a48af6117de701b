//! `attestctl challenge-key rotate`: a new pool challenge key, made in the
//! database every server of the pool shares (see `crate::challenge`).

use super::CtlError;
use crate::audit;
use crate::error::Error;
use clap::Subcommand;
use proto::cadf::Resource;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ChallengeKeyCommand {
    /// Make a new key current. Nonces issued under the one before stay
    /// valid until they expire; every server of the pool uses the new key
    /// from its next request on. Reads the server's database directly.
    Rotate {
        /// The server's configuration (for its database URL and name).
        #[arg(long)]
        server_config: PathBuf,
    },
}

pub async fn run(cmd: &ChallengeKeyCommand) -> Result<serde_json::Value, CtlError> {
    match cmd {
        ChallengeKeyCommand::Rotate { server_config } => {
            let cfg = crate::config::ServerConfig::load(Some(server_config))?;
            let store = crate::store::open(&cfg.database_url.0)
                .await
                .map_err(Error::from)?;
            // Who rotated it, as far as this machine knows.
            let operator = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
            let event = audit::event(
                &cfg.name,
                audit::client("admin", &format!("attestctl (local user {operator})")),
                Resource::server(&cfg.name),
                "update",
                "success",
                Some(("security", "challenge_key_rotated")),
                chrono::Utc::now(),
                None,
            );
            let keys = store
                .rotate_challenge_key(&event)
                .await
                .map_err(Error::from)?;
            Ok(serde_json::json!({ "rotated": true, "generation": keys.generation }))
        }
    }
}
