//! DMTF CADF (DSP0262 1.0) event model, as far as this service emits it.
//!
//! Field names follow the specification's JSON serialization (`typeURI`,
//! `eventTime`, …). Identifiers are UUIDs; resources that have a stable name
//! (a host, the server) get a name-based UUID so that events about the same
//! resource carry the same id.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const EVENT_TYPE_URI: &str = "http://schemas.dmtf.org/cloud/audit/1.0/event";
/// Namespace for name-based resource ids of this service.
const NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_8e5e_2b1d_4c5e_9a8e_7f4c_2d9b_1a01);

/// A stable UUID for a named resource (`kind` keeps hosts and services apart).
pub fn resource_id(kind: &str, name: &str) -> String {
    Uuid::new_v5(&NAMESPACE, format!("{kind}:{name}").as_bytes()).to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    #[serde(rename = "typeURI")]
    pub type_uri: String,
    pub id: String,
    #[serde(rename = "eventType")]
    pub event_type: String,
    /// ISO 8601 with an explicit UTC offset.
    #[serde(rename = "eventTime")]
    pub event_time: String,
    pub action: String,
    pub outcome: String,
    pub initiator: Resource,
    pub target: Resource,
    pub observer: Resource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measurements: Vec<Measurement>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reporterchain: Vec<Reporterstep>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resource {
    #[serde(rename = "typeURI")]
    pub type_uri: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reason {
    #[serde(rename = "reasonType")]
    pub reason_type: String,
    #[serde(rename = "reasonCode")]
    pub reason_code: String,
    #[serde(
        rename = "policyType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub policy_type: Option<String>,
    #[serde(rename = "policyId", default, skip_serializing_if = "Option::is_none")]
    pub policy_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub result: String,
    pub metric: Metric,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    #[serde(rename = "metricId")]
    pub metric_id: String,
    pub unit: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reporterstep {
    pub role: String,
    pub reporter: Resource,
    #[serde(rename = "reporterTime")]
    pub reporter_time: String,
}

/// CADF timestamps: microseconds and an explicit `+00:00` offset.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}

impl Resource {
    pub fn host(host: &str) -> Self {
        Self {
            type_uri: "compute/machine".into(),
            id: resource_id("host", host),
            name: Some(host.into()),
        }
    }
    pub fn server(name: &str) -> Self {
        Self {
            type_uri: "service/security".into(),
            id: resource_id("service", name),
            name: Some(name.into()),
        }
    }
}

/// A measurement of one PCR value.
pub fn pcr_measurement(bank: &str, index: u8, value_hex: &str) -> Measurement {
    let name = format!("PCR {index} ({bank})");
    Measurement {
        result: value_hex.to_string(),
        metric: Metric {
            metric_id: resource_id("metric", &format!("{bank}:{index}")),
            unit: "digest".into(),
            name,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_serializes_with_cadf_names() {
        let now = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let ev = Event {
            type_uri: EVENT_TYPE_URI.into(),
            id: Uuid::new_v4().to_string(),
            event_type: "activity".into(),
            event_time: timestamp(now),
            action: "evaluate".into(),
            outcome: "success".into(),
            initiator: Resource::host("n1"),
            target: Resource::host("n1"),
            observer: Resource::server("attestation-server"),
            reason: None,
            measurements: vec![pcr_measurement("sha256", 7, "00")],
            tags: vec![],
            reporterchain: vec![],
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["eventTime"], "2026-11-22T10:00:00.000000+00:00");
        assert_eq!(v["typeURI"], EVENT_TYPE_URI);
        assert_eq!(v["target"]["typeURI"], "compute/machine");
        assert_eq!(v["measurements"][0]["metric"]["unit"], "digest");
        assert!(v.get("reason").is_none());
        assert_eq!(resource_id("host", "n1"), ev.target.id);
        assert_ne!(resource_id("host", "n2"), ev.target.id);
    }
}
