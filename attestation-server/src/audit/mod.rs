//! The CADF audit trail: how each event is built ([`attestation_event`],
//! [`event`], …), the background tasks that deliver the stored events to
//! every sink ([`sinks`]), chain them ([`chain`]) and report trust changes,
//! and the query API ([`query`]).
//!
//! Events are written in the same database transaction as the change they
//! record (the `events` table is an outbox); each sink has its own cursor,
//! so a crash between commit and delivery loses nothing (at least once).
//! `docs/audit.md` lists every event kind with an example.

pub mod chain;
pub mod ctl;
pub mod query;
pub mod settings;
pub mod sinks;
pub mod tasks;

pub use settings::AuditConfig;

use crate::store::NewEvent;
use chrono::{DateTime, Utc};
use proto::cadf::{self, Event, Resource};
use proto::wire::{HostTrust, PcrValues, Reason, Trust};

/// Tag prefix naming the event kind (documented in docs/audit.md).
pub const KIND_TAG: &str = "kind?value=";
/// Tag prefix of the correlation id that ties events of one request together.
pub const CORRELATION_TAG: &str = "correlation_id?value=";

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
    let mut event = base(
        a.observer,
        Resource::host(a.initiator),
        Resource::host(a.host),
        "evaluate",
        if passed { "success" } else { "failure" },
        a.now,
        "attestation",
        a.correlation_id,
    );
    event.reason = reason.map(|r| cadf::Reason {
        reason_type: format!("attestation/{}", r.step),
        reason_code: r.code.clone(),
        policy_type: Some("whitelist".into()).filter(|_| r.step == "whitelist"),
        policy_id: Some(cadf::resource_id("whitelist", a.host)).filter(|_| r.step == "whitelist"),
    });
    event.measurements = measurements;
    event.tags.push("attestation".into());
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
    let kind = format!("{}.{}", noun(&target.type_uri), action);
    let correlation = uuid::Uuid::new_v4().to_string();
    let mut event = base(
        observer,
        initiator,
        target,
        action,
        outcome,
        now,
        &kind,
        &correlation,
    );
    event.reason = reason.map(|(t, c)| cadf::Reason {
        reason_type: t.into(),
        reason_code: c.into(),
        policy_type: None,
        policy_id: None,
    });
    to_new_event(&event, now, host)
}

/// The parts every event has: ids, time, resources, the observer as the
/// reporter, the kind and the correlation id.
#[allow(clippy::too_many_arguments)]
fn base(
    observer: &str,
    initiator: Resource,
    target: Resource,
    action: &str,
    outcome: &str,
    now: DateTime<Utc>,
    kind: &str,
    correlation_id: &str,
) -> Event {
    let time = cadf::timestamp(now);
    Event {
        type_uri: cadf::EVENT_TYPE_URI.into(),
        // Time-ordered (v7): events.id is a unique index, and random ids
        // put each insert on a random page of it (a page written to the
        // WAL per event); v7 ids of one commit share the index's last page.
        id: uuid::Uuid::now_v7().to_string(),
        event_type: "activity".into(),
        event_time: time.clone(),
        action: action.into(),
        outcome: outcome.into(),
        initiator,
        target,
        observer: Resource::server(observer),
        reason: None,
        measurements: Vec::new(),
        tags: vec![
            format!("{CORRELATION_TAG}{correlation_id}"),
            format!("{KIND_TAG}{kind}"),
        ],
        reporterchain: vec![cadf::Reporterstep {
            role: "observer".into(),
            reporter: Resource::server(observer),
            reporter_time: time,
        }],
    }
}

/// The short name of a resource type, for event kinds.
fn noun(type_uri: &str) -> &str {
    match type_uri {
        "compute/machine" => "host",
        "data/security/policy" => "whitelist",
        "service/security" => "service",
        other => other.rsplit('/').next().unwrap_or(other),
    }
}

/// The kind of a stored event body (`attestation`, `host.create`, …).
pub fn kind_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|t| t.as_str()?.strip_prefix(KIND_TAG).map(str::to_string))
        .unwrap_or_else(|| "event".into())
}

/// Add tags to a stored event (e.g. to mark an enrollment without an EK certificate).
pub fn with_tags(mut event: NewEvent, tags: &[&str]) -> NewEvent {
    if let Ok(mut parsed) = serde_json::from_str::<Event>(&event.body) {
        parsed.tags.extend(tags.iter().map(|t| t.to_string()));
        event.body = serde_json::to_string(&parsed).unwrap_or(event.body);
    }
    event
}

/// An admin, scheduler, auditor or agent as a CADF initiator.
pub fn client(role: &str, name: &str) -> Resource {
    if role == "agent" {
        // An agent speaks for its host: one CADF identity in every event.
        return Resource::host(name);
    }
    Resource {
        type_uri: "service/security/account/user".into(),
        id: cadf::resource_id(role, name),
        name: Some(name.into()),
    }
}

/// The event of a trust change noticed by the trust scanner.
pub fn trust_change_event(
    observer: &str,
    host: &str,
    from: Option<&str>,
    to: &str,
    now: DateTime<Utc>,
) -> NewEvent {
    let correlation = uuid::Uuid::new_v4().to_string();
    let mut event = base(
        observer,
        Resource::server(observer),
        Resource::host(host),
        "update",
        "success",
        now,
        "trust_change",
        &correlation,
    );
    event.reason = Some(cadf::Reason {
        reason_type: "trust/change".into(),
        reason_code: format!("{}_to_{to}", from.unwrap_or("unknown")),
        policy_type: Some("freshness".into()).filter(|_| to == "stale"),
        policy_id: Some(cadf::resource_id("policy", "freshness")).filter(|_| to == "stale"),
    });
    event.tags.push(format!("trust?value={to}"));
    to_new_event(&event, now, Some(host))
}

/// The event of a request refused for its credentials: no certificate
/// (`authenticate`), or a role or host that may not do what it asked.
pub fn access_denied_event(
    observer: &str,
    initiator: Option<(&str, &str)>,
    action: &str,
    path: &str,
    code: &str,
    now: DateTime<Utc>,
) -> NewEvent {
    let initiator = match initiator {
        Some((role, name)) => client(role, name),
        None => Resource {
            type_uri: "service/security/account/user".into(),
            id: cadf::resource_id("anonymous", "unauthenticated"),
            name: Some("unauthenticated client".into()),
        },
    };
    let target = Resource {
        type_uri: "service/security".into(),
        id: cadf::resource_id("endpoint", path),
        name: Some(path.to_string()),
    };
    let correlation = uuid::Uuid::new_v4().to_string();
    let mut event = base(
        observer,
        initiator,
        target,
        action,
        "failure",
        now,
        "access_denied",
        &correlation,
    );
    event.reason = Some(cadf::Reason {
        reason_type: "authorization".into(),
        reason_code: code.into(),
        policy_type: Some("role".into()),
        policy_id: Some(cadf::resource_id("policy", "roles")),
    });
    to_new_event(&event, now, None)
}

/// The CADF action of an HTTP method on our API.
pub fn action_of(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET | Method::HEAD => "read",
        Method::POST => "create",
        Method::PUT | Method::PATCH => "update",
        Method::DELETE => "delete",
        _ => "unknown",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_time_ordered_uuids_in_creation_order() {
        let now = Utc::now();
        let ids: Vec<String> = (0..1000)
            .map(|_| {
                let e = trust_change_event("srv", "h", Some("trusted"), "stale", now);
                serde_json::from_str::<Event>(&e.body).unwrap().id
            })
            .collect();
        for id in &ids {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7, "{id}");
        }
        // Hyphenated lowercase hex sorts as the bytes do: each id lands
        // after the last in the events.id index.
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    }

    #[test]
    fn every_builder_tags_kind_and_correlation_and_reports_the_observer() {
        let now = Utc::now();
        let events = [
            event(
                "srv",
                client("admin", "a"),
                Resource::host("h"),
                "create",
                "success",
                None,
                now,
                Some("h"),
            ),
            trust_change_event("srv", "h", Some("trusted"), "stale", now),
            access_denied_event("srv", None, "authenticate", "/v1/hosts", "x", now),
        ];
        let kinds: Vec<String> = events.iter().map(|e| kind_of(&e.body)).collect();
        assert_eq!(kinds, ["host.create", "trust_change", "access_denied"]);
        for e in &events {
            let v: Event = serde_json::from_str(&e.body).unwrap();
            assert!(v.tags.iter().any(|t| t.starts_with(CORRELATION_TAG)));
            assert_eq!(v.reporterchain.len(), 1);
            assert_eq!(v.reporterchain[0].reporter, v.observer);
        }
    }
}
