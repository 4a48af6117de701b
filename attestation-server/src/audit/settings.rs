//! The `[audit]` section of the server configuration.

use crate::config::Secret;
use crate::error::Error;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Days an event is kept; 0 keeps every event. An event is pruned only
    /// after it was delivered to every configured sink.
    pub retention_days: u64,
    /// Sign a checkpoint of the hash chain after this many new events…
    pub checkpoint_every: u64,
    /// …or this many seconds after the last one, whichever comes first.
    pub checkpoint_secs: u64,
    /// P-256 PKCS#8 PEM key that signs checkpoints when no `token_key` is
    /// configured; with neither, checkpoints are off (the chain still is on).
    pub key: Option<PathBuf>,
    /// Seconds between scans for trust changes (a verdict that expired).
    pub trust_scan_secs: u64,
    /// First retry delay of a failing sink; doubles up to `max_backoff_secs`.
    pub min_backoff_ms: u64,
    pub max_backoff_secs: u64,
    pub file: Option<FileSinkConfig>,
    pub webhook: Option<WebhookSinkConfig>,
    pub amqp: Option<AmqpSinkConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 0,
            checkpoint_every: 1000,
            checkpoint_secs: 60,
            key: None,
            trust_scan_secs: 5,
            min_backoff_ms: 200,
            max_backoff_secs: 30,
            file: None,
            webhook: None,
            amqp: None,
        }
    }
}

/// JSON lines, one CADF event per line, rotated by size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    /// Rotate before the file would grow past this size.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` is the newest).
    #[serde(default = "default_keep")]
    pub keep: u32,
}

fn default_max_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_keep() -> u32 {
    10
}

/// HTTPS POST of each event (JSON) to a collector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    pub url: String,
    /// PEM bundle of the CA(s) the collector's certificate must chain to.
    pub ca: PathBuf,
    /// Sent as `Authorization: Bearer …`.
    pub bearer_token: Option<Secret>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    10
}

/// AMQP 0-9-1 (RabbitMQ) in the OpenStack notification format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmqpSinkConfig {
    /// `amqp://user:password@host:5672/%2f`
    pub url: Secret,
    #[serde(default = "default_exchange")]
    pub exchange: String,
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    /// The notification's publisher_id; defaults to `attestation.<server name>`.
    pub publisher_id: Option<String>,
}

fn default_exchange() -> String {
    "openstack".into()
}
fn default_routing_key() -> String {
    "notifications.info".into()
}

impl AuditConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(k) = self.key.as_mut() {
            fix(k);
        }
        if let Some(f) = self.file.as_mut() {
            fix(&mut f.path);
        }
        if let Some(w) = self.webhook.as_mut() {
            fix(&mut w.ca);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, problem: &str| {
            Err(Error::Config {
                key: key.into(),
                problem: problem.into(),
            })
        };
        if self.checkpoint_every == 0 {
            return bad("audit.checkpoint_every", "must be at least 1");
        }
        if self.checkpoint_secs == 0 {
            return bad("audit.checkpoint_secs", "must be at least 1");
        }
        if self.trust_scan_secs == 0 {
            return bad("audit.trust_scan_secs", "must be at least 1");
        }
        if self.min_backoff_ms == 0 || self.max_backoff_secs == 0 {
            return bad("audit.min_backoff_ms", "backoff delays must be positive");
        }
        if let Some(f) = &self.file {
            if f.max_bytes < 4096 {
                return bad("audit.file.max_bytes", "must be at least 4096");
            }
            if f.keep == 0 {
                return bad("audit.file.keep", "must be at least 1");
            }
        }
        if let Some(w) = &self.webhook {
            if !w.url.starts_with("https://") {
                return bad("audit.webhook.url", "must be an https:// URL");
            }
            if w.timeout_secs == 0 {
                return bad("audit.webhook.timeout_secs", "must be at least 1");
            }
        }
        if let Some(a) = &self.amqp {
            if !(a.url.0.starts_with("amqp://") || a.url.0.starts_with("amqps://")) {
                return bad("audit.amqp.url", "must be an amqp:// URL");
            }
            if a.url.0.starts_with("amqps://") {
                return bad(
                    "audit.amqp.url",
                    "amqps:// is not supported by this build; use amqp:// on a trusted network or a TLS tunnel",
                );
            }
            if a.exchange.is_empty() {
                return bad("audit.amqp.exchange", "must not be empty");
            }
        }
        Ok(())
    }
}
