//! The audit API: `GET /v1/events` (filtered, cursor-paginated, JSON or
//! JSON lines) and `GET /v1/audit/status` (delivery lag and backlog per
//! sink, the chain head, the last checkpoint). Admin or auditor role.

use crate::api::Caller;
use crate::error::Error;
use crate::store::{Checkpoint, EventFilter};
use crate::tls::Role;
use crate::AppState;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;
const CURSOR_PREFIX: &str = "events:v1:";

/// The roles that may read the audit trail.
const READERS: &[Role] = &[Role::Admin, Role::Auditor];

/// One page of `GET /v1/events`.
#[derive(Debug, Serialize)]
pub struct EventPage {
    pub events: Vec<serde_json::Value>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// An opaque cursor: the last seq a page returned.
pub fn encode_cursor(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{seq}"))
}

pub fn decode_cursor(s: &str) -> Option<i64> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.strip_prefix(CURSOR_PREFIX)?
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
}

fn invalid(name: &str, problem: impl Into<String>) -> Error {
    Error::InvalidParameter {
        name: name.into(),
        problem: problem.into(),
    }
}

/// The parsed query of `GET /v1/events`.
#[derive(Debug, PartialEq, Eq)]
pub struct EventQuery {
    pub filter: EventFilter,
    pub after: i64,
    pub limit: i64,
    pub jsonl: bool,
}

/// Parse and check every parameter; unknown ones are refused by name.
pub fn parse_query(params: &HashMap<String, String>) -> Result<EventQuery, Error> {
    let mut q = EventQuery {
        filter: EventFilter::default(),
        after: 0,
        limit: DEFAULT_LIMIT,
        jsonl: false,
    };
    let text = |name: &str, v: &str| -> Result<Option<String>, Error> {
        if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
            return Err(invalid(name, "must be 1-256 printable characters"));
        }
        Ok(Some(v.to_string()))
    };
    let time = |name: &str, v: &str| -> Result<Option<DateTime<Utc>>, Error> {
        DateTime::parse_from_rfc3339(v)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| {
                invalid(
                    name,
                    format!("{v:?} is not an RFC 3339 time with offset: {e}"),
                )
            })
    };
    for (k, v) in params {
        match k.as_str() {
            "target" => q.filter.target = text(k, v)?,
            "initiator" => q.filter.initiator = text(k, v)?,
            "action" => {
                let ok = !v.is_empty()
                    && v.len() <= 64
                    && v.chars().all(|c| c.is_ascii_lowercase() || c == '/');
                if !ok {
                    return Err(invalid(
                        k,
                        "must be a CADF action such as evaluate or update",
                    ));
                }
                q.filter.action = Some(v.clone());
            }
            "outcome" => {
                if !["success", "failure", "pending", "unknown"].contains(&v.as_str()) {
                    return Err(invalid(k, "must be success, failure, pending or unknown"));
                }
                q.filter.outcome = Some(v.clone());
            }
            "since" => q.filter.since = time(k, v)?,
            "until" => q.filter.until = time(k, v)?,
            "limit" => {
                q.limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| invalid(k, format!("must be a number from 1 to {MAX_LIMIT}")))?;
            }
            "cursor" => {
                q.after = decode_cursor(v)
                    .ok_or_else(|| invalid(k, "not a cursor this server issued"))?;
            }
            "format" => match v.as_str() {
                "json" => q.jsonl = false,
                "jsonl" => q.jsonl = true,
                _ => return Err(invalid(k, "must be json or jsonl")),
            },
            other => return Err(invalid(other, "unknown parameter")),
        }
    }
    if let (Some(s), Some(u)) = (q.filter.since, q.filter.until) {
        if u <= s {
            return Err(invalid("until", "must be after since"));
        }
    }
    Ok(q)
}

pub async fn list_events(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Error> {
    caller.require(READERS, "read audit events")?;
    let Query(params) = params.map_err(|e| invalid("(query string)", e.body_text()))?;
    let mut q = parse_query(&params)?;
    let wants_ndjson = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    q.jsonl |= wants_ndjson && !params.contains_key("format");
    // One more than asked tells whether there is a next page.
    let mut rows = st
        .store
        .query_events(&q.filter, q.after, q.limit + 1)
        .await?;
    let more = rows.len() as i64 > q.limit;
    rows.truncate(q.limit as usize);
    let next_cursor = if more {
        rows.last().map(|e| encode_cursor(e.seq))
    } else {
        None
    };
    if q.jsonl {
        let mut body = String::new();
        for e in &rows {
            body.push_str(&e.body);
            body.push('\n');
        }
        let mut resp = body.into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        if let Some(c) = next_cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert("x-next-cursor", c);
        }
        return Ok(resp);
    }
    let events = rows
        .iter()
        .map(|e| serde_json::from_str(&e.body).unwrap_or(serde_json::Value::String(e.body.clone())))
        .collect();
    Ok(Json(EventPage {
        events,
        next_cursor,
    })
    .into_response())
}

/// One sink in `GET /v1/audit/status`.
#[derive(Debug, Serialize)]
pub struct SinkStatus {
    pub name: String,
    pub kind: String,
    pub delivered_seq: i64,
    /// Events stored but not yet delivered to this sink.
    pub backlog: i64,
    pub oldest_undelivered_at: Option<DateTime<Utc>>,
    /// Seconds the oldest undelivered event has waited (0 when caught up).
    pub lag_secs: f64,
    #[serde(flatten)]
    pub health: super::sinks::SinkHealth,
}

#[derive(Debug, Serialize)]
pub struct AuditStatus {
    pub server: String,
    pub newest_seq: i64,
    pub chain_count: i64,
    pub chain_hash: Option<String>,
    pub last_checkpoint: Option<Checkpoint>,
    pub sinks: Vec<SinkStatus>,
}

/// Delivery state of every configured sink (also used by `attestctl`).
pub async fn status(st: &AppState) -> Result<AuditStatus, Error> {
    let now = Utc::now();
    let health = st.audit_board.snapshot();
    let mut sinks = Vec::new();
    let mut newest = st.store.event_backlog(0).await?.newest_seq;
    for (name, kind) in super::sinks::configured(&st.config.audit, st.config.audit_file.as_ref()) {
        let cursor = st.store.sink_cursor(name).await?;
        let b = st.store.event_backlog(cursor).await?;
        newest = newest.max(b.newest_seq);
        sinks.push(SinkStatus {
            name: name.into(),
            kind: kind.into(),
            delivered_seq: cursor,
            backlog: b.count,
            oldest_undelivered_at: b.oldest,
            lag_secs: b
                .oldest
                .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0),
            health: health.get(name).cloned().unwrap_or_default(),
        });
    }
    let head = st.store.chain_head(&st.config.name).await?;
    Ok(AuditStatus {
        server: st.config.name.clone(),
        newest_seq: newest,
        chain_count: head.as_ref().map_or(0, |h| h.count),
        chain_hash: head.map(|h| h.hash),
        last_checkpoint: st.store.last_checkpoint(&st.config.name).await?,
        sinks,
    })
}

pub async fn audit_status(
    State(st): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<AuditStatus>, Error> {
    caller.require(READERS, "read the audit status")?;
    status(&st).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn bad_name(kv: &[(&str, &str)]) -> String {
        match parse_query(&params(kv)) {
            Err(Error::InvalidParameter { name, .. }) => name,
            other => panic!("expected invalid_parameter, got {other:?}"),
        }
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_cursor("42"), None);
        assert_eq!(decode_cursor(&encode_cursor(-1)), None);
    }

    #[test]
    fn invalid_parameters_are_named() {
        assert_eq!(bad_name(&[("limit", "0")]), "limit");
        assert_eq!(bad_name(&[("limit", "5000")]), "limit");
        assert_eq!(bad_name(&[("cursor", "nope")]), "cursor");
        assert_eq!(bad_name(&[("since", "yesterday")]), "since");
        assert_eq!(bad_name(&[("outcome", "maybe")]), "outcome");
        assert_eq!(bad_name(&[("action", "DROP TABLE")]), "action");
        assert_eq!(bad_name(&[("colour", "red")]), "colour");
        assert_eq!(
            bad_name(&[
                ("since", "2026-01-02T00:00:00Z"),
                ("until", "2026-01-01T00:00:00Z")
            ]),
            "until"
        );
        let q = parse_query(&params(&[
            ("outcome", "failure"),
            ("limit", "5"),
            ("format", "jsonl"),
        ]))
        .unwrap();
        assert_eq!(q.filter.outcome.as_deref(), Some("failure"));
        assert_eq!(q.limit, 5);
        assert!(q.jsonl);
    }
}
