//! Delivery of stored events to sinks: a JSON-lines file with size-based
//! rotation, an HTTPS webhook, and AMQP 0-9-1 in the OpenStack notification
//! format. One [`Deliverer`] task per sink, each with its own cursor in
//! `sink_cursors`: in order per sink, at least once, retried with backoff,
//! resumed after a restart from the cursor.

use super::settings::{AmqpSinkConfig, AuditConfig, FileSinkConfig, WebhookSinkConfig};
use crate::store::{Store, StoredEvent};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// Events read from the outbox per delivery attempt.
const BATCH: i64 = 200;
/// How long a shutdown waits for a last delivery attempt.
const FLUSH_ON_SHUTDOWN: Duration = Duration::from_secs(3);

/// Why a delivery stopped, after how many events of the batch went out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    pub delivered: usize,
    pub detail: String,
}

impl DeliveryError {
    fn new(delivered: usize, detail: impl std::fmt::Display) -> Self {
        Self {
            delivered,
            detail: detail.to_string(),
        }
    }
}

/// A destination of audit events.
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Deliver `batch` in order; on failure say how many went out.
    async fn deliver(&mut self, batch: &[StoredEvent]) -> Result<(), DeliveryError>;
}

/// What operators see of one sink (`GET /v1/audit/status`, logs).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SinkHealth {
    pub kind: String,
    pub last_delivery_at: Option<DateTime<Utc>>,
    pub delivered_since_start: u64,
    pub consecutive_failures: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub next_retry_in_ms: Option<u64>,
}

/// Health of every running sink, by sink name.
#[derive(Debug, Default)]
pub struct StatusBoard(Mutex<BTreeMap<String, SinkHealth>>);

impl StatusBoard {
    pub fn snapshot(&self) -> BTreeMap<String, SinkHealth> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn update(&self, sink: &str, f: impl FnOnce(&mut SinkHealth)) {
        if let Ok(mut m) = self.0.lock() {
            f(m.entry(sink.to_string()).or_default());
        }
    }
}

/// The sinks a configuration names, as `(name, kind)`; the names are the
/// cursors' keys (the file sink keeps the cursor of earlier versions).
pub fn configured(
    cfg: &AuditConfig,
    legacy_file: Option<&PathBuf>,
) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if cfg.file.is_some() || legacy_file.is_some() {
        out.push(("file", "jsonl-file"));
    }
    if cfg.webhook.is_some() {
        out.push(("webhook", "https-webhook"));
    }
    if cfg.amqp.is_some() {
        out.push(("amqp", "amqp-oslo-messagingv2"));
    }
    out
}

/// A sink and the name of its cursor.
pub type NamedSink = (&'static str, Box<dyn Sink>);

/// Build the configured sinks.
pub fn build(
    cfg: &AuditConfig,
    legacy_file: Option<&PathBuf>,
    server_name: &str,
) -> Result<Vec<NamedSink>, crate::error::Error> {
    let mut out: Vec<NamedSink> = Vec::new();
    let file = cfg.file.clone().or_else(|| {
        legacy_file.map(|p| FileSinkConfig {
            path: p.clone(),
            max_bytes: 100 * 1024 * 1024,
            keep: 10,
        })
    });
    if let Some(f) = file {
        out.push(("file", Box::new(FileSink::new(f))));
    }
    if let Some(w) = &cfg.webhook {
        out.push(("webhook", Box::new(WebhookSink::new(w)?)));
    }
    if let Some(a) = &cfg.amqp {
        out.push(("amqp", Box::new(AmqpSink::new(a, server_name))));
    }
    Ok(out)
}

/// Copies stored events to one sink, in order, at least once.
pub struct Deliverer {
    pub name: &'static str,
    pub sink: Box<dyn Sink>,
    pub store: Arc<dyn Store>,
    pub wake: Arc<Notify>,
    pub board: Arc<StatusBoard>,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Deliverer {
    /// Run until `shutdown` resolves; failures are logged and retried with
    /// exponential backoff, the backlog stays in the outbox meanwhile.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = self.min_backoff;
        loop {
            // A shutdown interrupts a delivery (a hanging sink must not hold
            // the server up); what was sent but not recorded is sent again
            // after the restart, with the same event ids.
            let attempt = tokio::select! {
                r = self.deliver_pending() => Some(r),
                _ = &mut shutdown => None,
            };
            let Some(attempt) = attempt else {
                let _ = tokio::time::timeout(FLUSH_ON_SHUTDOWN, self.deliver_pending()).await;
                return;
            };
            let healthy = match attempt {
                Ok(n) => {
                    if backoff > self.min_backoff {
                        tracing::info!(
                            sink = self.name,
                            delivered = n,
                            "audit sink recovered; backlog delivered"
                        );
                    }
                    backoff = self.min_backoff;
                    true
                }
                Err(detail) => {
                    let backlog = match self.store.sink_cursor(self.name).await {
                        Ok(c) => self
                            .store
                            .event_backlog(c)
                            .await
                            .map(|b| b.count)
                            .unwrap_or(-1),
                        Err(_) => -1,
                    };
                    tracing::warn!(sink = self.name, error = %detail, backlog, retry_in_ms = backoff.as_millis() as u64, "audit delivery failed; retrying");
                    let wait = backoff;
                    self.board.update(self.name, |h| {
                        h.consecutive_failures += 1;
                        h.last_error = Some(detail);
                        h.last_error_at = Some(Utc::now());
                        h.next_retry_in_ms = Some(wait.as_millis() as u64);
                    });
                    backoff = (backoff * 2).min(self.max_backoff);
                    false
                }
            };
            let wait = if healthy {
                Duration::from_secs(1)
            } else {
                backoff
            };
            tokio::select! {
                _ = &mut shutdown => {
                    // Flush what was committed before the shutdown, briefly:
                    // a hanging sink must not hold the server up.
                    let _ = tokio::time::timeout(FLUSH_ON_SHUTDOWN, self.deliver_pending()).await;
                    return;
                }
                _ = self.wake.notified(), if healthy => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Deliver every undelivered event; returns how many went out.
    pub async fn deliver_pending(&mut self) -> Result<usize, String> {
        let mut total = 0;
        loop {
            let cursor = self
                .store
                .sink_cursor(self.name)
                .await
                .map_err(|e| e.to_string())?;
            let batch = self
                .store
                .stored_events_after(cursor, BATCH)
                .await
                .map_err(|e| e.to_string())?;
            if batch.is_empty() {
                return Ok(total);
            }
            let result = self.sink.deliver(&batch).await;
            let delivered = match &result {
                Ok(()) => batch.len(),
                Err(e) => e.delivered.min(batch.len()),
            };
            if let Some(last) = delivered.checked_sub(1).and_then(|i| batch.get(i)) {
                self.store
                    .set_sink_cursor(self.name, last.seq)
                    .await
                    .map_err(|e| e.to_string())?;
                total += delivered;
                self.board.update(self.name, |h| {
                    h.last_delivery_at = Some(Utc::now());
                    h.delivered_since_start += delivered as u64;
                });
            }
            if let Err(e) = result {
                return Err(e.detail);
            }
            self.board.update(self.name, |h| {
                h.consecutive_failures = 0;
                h.next_retry_in_ms = None;
            });
        }
    }
}

/// JSON lines, one CADF event per line; rotated by size.
pub struct FileSink {
    cfg: FileSinkConfig,
}

impl FileSink {
    pub fn new(cfg: FileSinkConfig) -> Self {
        Self { cfg }
    }

    fn rotated(path: &Path, n: u32) -> PathBuf {
        let mut s = path.as_os_str().to_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    /// `audit.jsonl` becomes `audit.jsonl.1`, `.1` becomes `.2`, …; the
    /// oldest beyond `keep` is removed.
    async fn rotate(&self) -> std::io::Result<()> {
        let p = &self.cfg.path;
        let _ = tokio::fs::remove_file(Self::rotated(p, self.cfg.keep)).await;
        for n in (1..self.cfg.keep).rev() {
            let from = Self::rotated(p, n);
            if tokio::fs::try_exists(&from).await.unwrap_or(false) {
                tokio::fs::rename(&from, Self::rotated(p, n + 1)).await?;
            }
        }
        tokio::fs::rename(p, Self::rotated(p, 1)).await
    }

    async fn append(&self, text: &str) -> std::io::Result<()> {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cfg.path)
            .await?;
        file.write_all(text.as_bytes()).await?;
        file.sync_data().await
    }
}

#[async_trait::async_trait]
impl Sink for FileSink {
    async fn deliver(&mut self, batch: &[StoredEvent]) -> Result<(), DeliveryError> {
        let path = self.cfg.path.display().to_string();
        let mut size = match tokio::fs::metadata(&self.cfg.path).await {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        let mut pending = String::new();
        let mut written = 0;
        for (i, e) in batch.iter().enumerate() {
            let line_len = e.body.len() as u64 + 1;
            if size > 0 && size + line_len > self.cfg.max_bytes {
                if !pending.is_empty() {
                    self.append(&pending)
                        .await
                        .map_err(|err| DeliveryError::new(written, format!("{path}: {err}")))?;
                    pending.clear();
                    written = i;
                }
                self.rotate().await.map_err(|err| {
                    DeliveryError::new(written, format!("rotating {path}: {err}"))
                })?;
                size = 0;
            }
            pending.push_str(&e.body);
            pending.push('\n');
            size += line_len;
        }
        if !pending.is_empty() {
            self.append(&pending)
                .await
                .map_err(|err| DeliveryError::new(written, format!("{path}: {err}")))?;
        }
        Ok(())
    }
}

/// HTTPS POST of each event (the CADF JSON), one request per event so a
/// collector sees them in order; `X-Audit-Seq` and `X-Audit-Event-Id` let it
/// drop the duplicates at-least-once delivery allows.
pub struct WebhookSink {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl WebhookSink {
    pub fn new(cfg: &WebhookSinkConfig) -> Result<Self, crate::error::Error> {
        use rustls_pki_types::pem::PemObject;
        let bad = |problem: String| crate::error::Error::Config {
            key: "audit.webhook.ca".into(),
            problem,
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(&cfg.ca)
            .map_err(|e| bad(format!("cannot read {}: {e}", cfg.ca.display())))?;
        for c in certs {
            let c = c.map_err(|e| bad(format!("bad certificate in {}: {e}", cfg.ca.display())))?;
            roots.add(c).map_err(|e| bad(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let timeout = Duration::from_secs(cfg.timeout_secs);
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            http,
            url: cfg.url.clone(),
            token: cfg.bearer_token.as_ref().map(|t| t.0.clone()),
        })
    }
}

#[async_trait::async_trait]
impl Sink for WebhookSink {
    async fn deliver(&mut self, batch: &[StoredEvent]) -> Result<(), DeliveryError> {
        for (i, e) in batch.iter().enumerate() {
            let mut req = self
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header("x-audit-seq", e.seq.to_string())
                .header("x-audit-event-id", &e.id)
                .body(e.body.clone());
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {}
                Ok(resp) => {
                    return Err(DeliveryError::new(
                        i,
                        format!("{} answered HTTP {}", self.url, resp.status()),
                    ))
                }
                Err(err) => {
                    return Err(DeliveryError::new(
                        i,
                        format!("{}: {}", self.url, proto::client::error_chain(&err)),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The oslo.messaging "messagingv2" envelope of one event, as OpenStack
/// notification consumers read it.
pub fn oslo_envelope(e: &StoredEvent, publisher_id: &str) -> serde_json::Value {
    let payload: serde_json::Value =
        serde_json::from_str(&e.body).unwrap_or(serde_json::Value::String(e.body.clone()));
    let message = serde_json::json!({
        // The event id, so a redelivered event carries the same message id.
        "message_id": e.id,
        "publisher_id": publisher_id,
        "event_type": format!("audit.{}", super::kind_of(&e.body)),
        "priority": "INFO",
        "payload": payload,
        // oslo's format: naive UTC with microseconds.
        "timestamp": e.time.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
    });
    serde_json::json!({
        "oslo.version": "2.0",
        "oslo.message": message.to_string(),
    })
}

/// AMQP 0-9-1 publisher with publisher confirms: an event counts as
/// delivered once the broker acknowledged it.
pub struct AmqpSink {
    cfg: AmqpSinkConfig,
    publisher_id: String,
    channel: Option<(lapin::Connection, lapin::Channel)>,
}

impl AmqpSink {
    pub fn new(cfg: &AmqpSinkConfig, server_name: &str) -> Self {
        Self {
            publisher_id: cfg
                .publisher_id
                .clone()
                .unwrap_or_else(|| format!("attestation.{server_name}")),
            cfg: cfg.clone(),
            channel: None,
        }
    }

    async fn connect(&self) -> Result<(lapin::Connection, lapin::Channel), lapin::Error> {
        use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
        let conn =
            lapin::Connection::connect(&self.cfg.url.0, lapin::ConnectionProperties::default())
                .await?;
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            self.cfg.exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok((conn, ch))
    }
}

#[async_trait::async_trait]
impl Sink for AmqpSink {
    async fn deliver(&mut self, batch: &[StoredEvent]) -> Result<(), DeliveryError> {
        let timeout = Duration::from_secs(10);
        if self.channel.is_none() {
            let connected = tokio::time::timeout(timeout, self.connect())
                .await
                .map_err(|_| DeliveryError::new(0, "connecting to the AMQP broker timed out"))?
                .map_err(|e| DeliveryError::new(0, format!("AMQP connect: {e}")))?;
            self.channel = Some(connected);
        }
        let Some((_, ch)) = &self.channel else {
            return Err(DeliveryError::new(0, "no AMQP channel"));
        };
        let mut confirms = Vec::with_capacity(batch.len());
        let mut failure = None;
        for e in batch {
            let body = oslo_envelope(e, &self.publisher_id).to_string();
            let props = lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_message_id(e.id.as_str().into())
                .with_delivery_mode(2);
            match ch
                .basic_publish(
                    self.cfg.exchange.as_str().into(),
                    self.cfg.routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
            {
                Ok(c) => confirms.push(c),
                Err(err) => {
                    failure = Some(format!("AMQP publish: {err}"));
                    break;
                }
            }
        }
        let mut acked = 0;
        for c in confirms {
            match tokio::time::timeout(timeout, c).await {
                Ok(Ok(conf)) if conf.is_ack() => acked += 1,
                Ok(Ok(_)) => {
                    failure.get_or_insert_with(|| "the AMQP broker refused an event (nack)".into());
                    break;
                }
                Ok(Err(err)) => {
                    failure.get_or_insert_with(|| format!("AMQP confirm: {err}"));
                    break;
                }
                Err(_) => {
                    failure.get_or_insert_with(|| "the AMQP broker did not confirm in time".into());
                    break;
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(detail) => {
                // Reconnect on the next attempt.
                self.channel = None;
                Err(DeliveryError::new(acked, detail))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seq: i64, body: &str) -> StoredEvent {
        StoredEvent {
            seq,
            id: format!("id-{seq}"),
            time: Utc::now(),
            server: "s".into(),
            chain_index: seq,
            prev_hash: String::new(),
            hash: String::new(),
            body: body.into(),
        }
    }

    #[tokio::test]
    async fn file_sink_rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = FileSink::new(FileSinkConfig {
            path: path.clone(),
            max_bytes: 4096,
            keep: 2,
        });
        let body = format!("{{\"x\":\"{}\"}}", "a".repeat(1000));
        let batch: Vec<_> = (1..=20).map(|i| stored(i, &body)).collect();
        sink.deliver(&batch).await.unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.len() <= 4096, "{}", current.len());
        assert!(path.with_extension("jsonl.1").exists());
        assert!(path.with_extension("jsonl.2").exists());
        assert!(!path.with_extension("jsonl.3").exists());
        let lines = current.lines().count()
            + std::fs::read_to_string(path.with_extension("jsonl.1"))
                .unwrap()
                .lines()
                .count();
        assert!(lines >= 6);
    }

    #[test]
    fn oslo_envelope_wraps_the_event_as_a_json_string() {
        let e = stored(1, r#"{"id":"x","tags":["kind?value=attestation"]}"#);
        let env = oslo_envelope(&e, "attestation.s");
        assert_eq!(env["oslo.version"], "2.0");
        let msg: serde_json::Value =
            serde_json::from_str(env["oslo.message"].as_str().unwrap()).unwrap();
        assert_eq!(msg["event_type"], "audit.attestation");
        assert_eq!(msg["priority"], "INFO");
        assert_eq!(msg["payload"]["id"], "x");
        assert_eq!(msg["message_id"], "id-1");
    }
}
