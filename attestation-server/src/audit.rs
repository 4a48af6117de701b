//! CADF audit events: how each one is built, and the deliverer that copies
//! the stored events (the outbox) to the JSON-lines audit file.
//!
//! Events are written in the same database transaction as the change they
//! record; delivery to the file happens afterwards, from the events table,
//! with a per-sink cursor, so a crash between commit and append loses
//! nothing (the event is appended after restart; at least once).

use crate::error::Error;
use crate::store::{NewEvent, Store};
use chrono::{DateTime, Utc};
use proto::cadf::{self, Event, Resource};
use proto::wire::{HostTrust, PcrValues, Reason, Trust};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// What an attestation event reports.
pub struct Attestation<'a> {
    pub observer: &'a str,
    pub host: &'a str,
    /// The authenticated caller (normally the host itself).
    pub initiator: &'a str,
    pub now: DateTime<Utc>,
    /// `None` when the evidence was refused before a verdict.
    pub verdict: Option<&'a HostTrust>,
    /// Why it failed, when it failed.
    pub reason: Option<&'a Reason>,
    /// The PCR values measured (only from evidence whose integrity held).
    pub pcrs: Option<&'a PcrValues>,
    pub correlation_id: &'a str,
}

/// The CADF event of one attestation, passing or failing.
pub fn attestation_event(a: &Attestation<'_>) -> NewEvent {
    let passed = a.verdict.is_some_and(|v| v.trust == Trust::Trusted);
    let reason = a
        .reason
        .or_else(|| a.verdict.and_then(|v| v.reasons.first()));
    let measurements = a
        .pcrs
        .map(|banks| {
            banks
                .iter()
                .flat_map(|(bank, values)| {
                    values
                        .iter()
                        .map(move |(i, v)| cadf::pcr_measurement(bank.name(), *i, v))
                })
                .collect()
        })
        .unwrap_or_default();
    let event = Event {
        type_uri: cadf::EVENT_TYPE_URI.into(),
        id: uuid::Uuid::new_v4().to_string(),
        event_type: "activity".into(),
        event_time: cadf::timestamp(a.now),
        action: "evaluate".into(),
        outcome: if passed { "success" } else { "failure" }.into(),
        initiator: Resource::host(a.initiator),
        target: Resource::host(a.host),
        observer: Resource::server(a.observer),
        reason: reason.map(|r| cadf::Reason {
            reason_type: format!("attestation/{}", r.step),
            reason_code: r.code.clone(),
            policy_type: Some("whitelist".into()).filter(|_| r.step == "whitelist"),
            policy_id: None,
        }),
        measurements,
        tags: vec![
            format!("correlation_id?value={}", a.correlation_id),
            "attestation".into(),
        ],
        reporterchain: Vec::new(),
    };
    to_new_event(&event, a.now, Some(a.host))
}

/// A generic event: `initiator` did `action` on `target`.
#[allow(clippy::too_many_arguments)]
pub fn event(
    observer: &str,
    initiator: Resource,
    target: Resource,
    action: &str,
    outcome: &str,
    reason: Option<(&str, &str)>,
    now: DateTime<Utc>,
    host: Option<&str>,
) -> NewEvent {
    let event = Event {
        type_uri: cadf::EVENT_TYPE_URI.into(),
        id: uuid::Uuid::new_v4().to_string(),
        event_type: "activity".into(),
        event_time: cadf::timestamp(now),
        action: action.into(),
        outcome: outcome.into(),
        initiator,
        target,
        observer: Resource::server(observer),
        reason: reason.map(|(t, c)| cadf::Reason {
            reason_type: t.into(),
            reason_code: c.into(),
            policy_type: None,
            policy_id: None,
        }),
        measurements: Vec::new(),
        tags: Vec::new(),
        reporterchain: Vec::new(),
    };
    to_new_event(&event, now, host)
}

/// Add tags to a stored event (e.g. to mark an enrollment without an EK certificate).
pub fn with_tags(mut event: NewEvent, tags: &[&str]) -> NewEvent {
    if let Ok(mut parsed) = serde_json::from_str::<Event>(&event.body) {
        parsed.tags.extend(tags.iter().map(|t| t.to_string()));
        event.body = serde_json::to_string(&parsed).unwrap_or(event.body);
    }
    event
}

/// An admin, scheduler or agent as a CADF initiator.
pub fn client(role: &str, name: &str) -> Resource {
    Resource {
        type_uri: if role == "agent" {
            "compute/machine"
        } else {
            "service/security/account/user"
        }
        .into(),
        id: cadf::resource_id(role, name),
        name: Some(name.into()),
    }
}

/// The whitelist of one host, as a CADF target.
pub fn policy_target(host: &str) -> Resource {
    Resource {
        type_uri: "data/security/policy".into(),
        id: cadf::resource_id("whitelist", host),
        name: Some(format!("whitelist of {host}")),
    }
}

fn to_new_event(event: &Event, now: DateTime<Utc>, host: Option<&str>) -> NewEvent {
    NewEvent {
        id: event.id.clone(),
        time: now,
        host: host.map(str::to_string),
        body: serde_json::to_string(event).unwrap_or_default(),
    }
}

/// Copies stored events to the audit file, in order, at least once.
pub struct FileDeliverer {
    pub store: Arc<dyn Store>,
    pub path: PathBuf,
    pub wake: Arc<Notify>,
}

const SINK: &str = "file";

impl FileDeliverer {
    /// Run until `shutdown` resolves; errors are logged and retried.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.deliver_once().await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "audit file delivery failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
            tokio::select! {
                _ = &mut shutdown => {
                    // Flush what was committed before the shutdown.
                    let _ = self.deliver_once().await;
                    return;
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(backoff.max(Duration::from_secs(1))) => {}
            }
        }
    }

    /// Append every undelivered event; returns how many were appended.
    pub async fn deliver_once(&self) -> Result<usize, Error> {
        let io = |source| Error::Io {
            path: self.path.display().to_string(),
            source,
        };
        let mut total = 0;
        loop {
            let cursor = self.store.sink_cursor(SINK).await?;
            let batch = self.store.events_after(cursor, 500).await?;
            let Some((last, _)) = batch.last() else {
                return Ok(total);
            };
            let last = *last;
            let mut out = String::new();
            for (_, body) in &batch {
                out.push_str(body);
                out.push('\n');
            }
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await
                .map_err(io)?;
            file.write_all(out.as_bytes()).await.map_err(io)?;
            file.sync_data().await.map_err(io)?;
            self.store.set_sink_cursor(SINK, last).await?;
            total += batch.len();
        }
    }
}
