//! Operations endpoints: `GET /healthz` (the process answers), `GET /readyz`
//! (the database answers; migrations ran before the listener opened),
//! `GET /metrics` (Prometheus text format, any client certificate) and
//! `GET /v1/status` (hosts by trust and audit backlog, for `attestctl check`).
//!
//! The counters live in [`Metrics`] in `AppState`; the pool's shape (hosts
//! by trust, audit backlog) is read from the store at each scrape, so every
//! server sharing one database reports the same pool.

use crate::api::Caller;
use crate::error::Error;
use crate::store::TrustCounts;
use crate::tls::Role;
use crate::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use proto::wire::{HostTrust, Trust};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the verification latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The labels of one attestation counter: the verdict, and for an
/// untrusted one the step and code of its first reason.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Outcome {
    trust: &'static str,
    step: String,
    code: String,
}

/// Counters and the latency histogram, updated by the evidence handler.
#[derive(Debug, Default)]
pub struct Metrics {
    attestations: Mutex<BTreeMap<Outcome, u64>>,
    /// Cumulative count per bucket of [`LATENCY_BUCKETS`] (`le` semantics).
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    throttled: AtomicU64,
    ima_received: AtomicU64,
    ima_verified: AtomicU64,
}

impl Metrics {
    /// Count one judged evidence submission and how long judging it took.
    pub fn observe_attestation(&self, verdict: &HostTrust, took: Duration) {
        let (step, code) = match (verdict.trust, verdict.reasons.first()) {
            (Trust::Trusted, _) | (_, None) => (String::new(), String::new()),
            (_, Some(r)) => (r.step.clone(), r.code.clone()),
        };
        let key = Outcome {
            trust: verdict.trust.as_str(),
            step,
            code,
        };
        // A poisoned lock only means another thread panicked mid-increment;
        // the map itself is still valid.
        let mut map = self
            .attestations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *map.entry(key).or_default() += 1;
        drop(map);
        let secs = took.as_secs_f64();
        for (bound, slot) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                slot.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Count the IMA entries one stored attestation carried (`received`)
    /// and the new ones it verified (`verified`): an agent that sends only
    /// what the server has not verified keeps the two close.
    pub fn observe_ima(&self, received: u64, verified: u64) {
        self.ima_received.fetch_add(received, Ordering::Relaxed);
        self.ima_verified.fetch_add(verified, Ordering::Relaxed);
    }

    /// Count one challenge or evidence request refused by the failure throttle.
    pub fn observe_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters and histogram in the Prometheus text format.
    pub fn render_counters(&self, out: &mut String) {
        family(
            out,
            "attestation_attestations_total",
            "counter",
            "Evidence submissions judged, by verdict and (untrusted) failure step and code.",
        );
        let map = self
            .attestations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for (k, n) in &map {
            if k.step.is_empty() && k.code.is_empty() {
                let _ = writeln!(
                    out,
                    "attestation_attestations_total{{outcome=\"{}\"}} {n}",
                    k.trust
                );
            } else {
                let _ = writeln!(
                    out,
                    "attestation_attestations_total{{outcome=\"{}\",step=\"{}\",code=\"{}\"}} {n}",
                    k.trust,
                    escape(&k.step),
                    escape(&k.code)
                );
            }
        }
        let name = "attestation_verification_duration_seconds";
        family(
            out,
            name,
            "histogram",
            "Time from evidence received to verdict stored.",
        );
        for (bound, slot) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                slot.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
        family(
            out,
            "attestation_throttled_requests_total",
            "counter",
            "Challenge and evidence requests answered 429 too_many_failures (the host's evidence kept being refused).",
        );
        let _ = writeln!(
            out,
            "attestation_throttled_requests_total {}",
            self.throttled.load(Ordering::Relaxed)
        );
        for (name, help, value) in [
            (
                "attestation_ima_entries_received_total",
                "IMA list entries received in evidence that was stored.",
                &self.ima_received,
            ),
            (
                "attestation_ima_entries_verified_total",
                "IMA list entries replayed to a quote and judged for the first time.",
                &self.ima_verified,
            ),
        ] {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values are escaped as the exposition format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Undelivered audit events of one sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkBacklog {
    pub sink: String,
    pub backlog: i64,
    /// Seconds the oldest undelivered event has waited (0 when caught up).
    pub lag_secs: f64,
}

/// `GET /v1/status`: what a monitoring check needs in one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolStatus {
    pub server: String,
    pub hosts: TrustCounts,
    pub audit: Vec<SinkBacklog>,
}

impl PoolStatus {
    /// The largest backlog of any sink (the one that alarms).
    pub fn max_backlog(&self) -> i64 {
        self.audit.iter().map(|s| s.backlog).max().unwrap_or(0)
    }
}

/// Hosts by trust and each sink's backlog, read from the store.
pub async fn pool_status(st: &AppState) -> Result<PoolStatus, Error> {
    let now = Utc::now();
    let hosts = st.store.trust_counts(now).await?;
    let audit = sink_backlogs(st).await?;
    Ok(PoolStatus {
        server: st.config.name.clone(),
        hosts,
        audit,
    })
}

/// Backlog per configured sink, as `GET /v1/audit/status` computes it.
async fn sink_backlogs(st: &AppState) -> Result<Vec<SinkBacklog>, Error> {
    let now = Utc::now();
    let mut out = Vec::new();
    for (name, _kind) in
        crate::audit::sinks::configured(&st.config.audit, st.config.audit_file.as_ref())
    {
        let cursor = st.store.sink_cursor(name).await?;
        let b = st.store.event_backlog(cursor).await?;
        out.push(SinkBacklog {
            sink: name.into(),
            backlog: b.count,
            lag_secs: b
                .oldest
                .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0),
        });
    }
    Ok(out)
}

/// Liveness: the process answers HTTP.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the database answers (503 `storage_unavailable` otherwise).
pub async fn readyz(State(st): State<Arc<AppState>>) -> Result<Json<serde_json::Value>, Error> {
    st.store.ping().await?;
    Ok(Json(serde_json::json!({"status": "ready"})))
}

/// `GET /v1/status` (admin or auditor).
pub async fn status(
    State(st): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<PoolStatus>, Error> {
    caller.require(&[Role::Admin, Role::Auditor], "read the pool status")?;
    pool_status(&st).await.map(Json)
}

/// `GET /metrics`: any client certificate (the metrics reveal the pool's shape).
pub async fn metrics(State(st): State<Arc<AppState>>, _caller: Caller) -> Response {
    let mut out = String::with_capacity(4096);
    st.metrics.render_counters(&mut out);
    // The store-derived gauges; a database that does not answer is itself
    // reported rather than failing the scrape (the counters stay visible).
    let started = Instant::now();
    let counts = st.store.trust_counts(Utc::now()).await;
    let db_secs = started.elapsed().as_secs_f64();
    let backlogs = match counts {
        Ok(_) => sink_backlogs(&st).await.ok(),
        Err(_) => None,
    };
    family(
        &mut out,
        "attestation_database_up",
        "gauge",
        "1 when the scrape's database queries succeeded.",
    );
    let up = counts.is_ok() && backlogs.is_some();
    let _ = writeln!(out, "attestation_database_up {}", u8::from(up));
    family(
        &mut out,
        "attestation_database_query_duration_seconds",
        "gauge",
        "Duration of this scrape's hosts-by-trust query.",
    );
    let _ = writeln!(out, "attestation_database_query_duration_seconds {db_secs}");
    if let Ok(c) = counts {
        family(
            &mut out,
            "attestation_hosts",
            "gauge",
            "Registered hosts by current trust (an expired verdict is unknown).",
        );
        for (trust, n) in [
            ("trusted", c.trusted),
            ("untrusted", c.untrusted),
            ("unknown", c.unknown),
        ] {
            let _ = writeln!(out, "attestation_hosts{{trust=\"{trust}\"}} {n}");
        }
    }
    if let Some(sinks) = backlogs {
        family(
            &mut out,
            "attestation_audit_backlog_events",
            "gauge",
            "Audit events stored but not yet delivered, per sink.",
        );
        for s in &sinks {
            let _ = writeln!(
                out,
                "attestation_audit_backlog_events{{sink=\"{}\"}} {}",
                escape(&s.sink),
                s.backlog
            );
        }
        family(
            &mut out,
            "attestation_audit_lag_seconds",
            "gauge",
            "Age of the oldest undelivered audit event, per sink.",
        );
        for s in &sinks {
            let _ = writeln!(
                out,
                "attestation_audit_lag_seconds{{sink=\"{}\"}} {}",
                escape(&s.sink),
                s.lag_secs
            );
        }
    }
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::Reason;

    fn verdict(trust: Trust, code: Option<&str>) -> HostTrust {
        HostTrust {
            host: "node1".into(),
            trust,
            verified_at: None,
            expires_at: None,
            reasons: code
                .map(|c| Reason {
                    step: "whitelist".into(),
                    code: c.into(),
                    message: String::new(),
                    pcr: None,
                })
                .into_iter()
                .collect(),
            policy: None,
        }
    }

    #[test]
    fn counters_and_histogram_render_in_text_format() {
        let m = Metrics::default();
        m.observe_attestation(&verdict(Trust::Trusted, None), Duration::from_millis(3));
        m.observe_attestation(&verdict(Trust::Trusted, None), Duration::from_millis(30));
        m.observe_attestation(
            &verdict(Trust::Untrusted, Some("pcr_\"x\"")),
            Duration::from_secs(10),
        );
        let mut out = String::new();
        m.render_counters(&mut out);
        assert!(out.contains("attestation_attestations_total{outcome=\"trusted\"} 2\n"));
        assert!(out.contains(
            "attestation_attestations_total{outcome=\"untrusted\",step=\"whitelist\",code=\"pcr_\\\"x\\\"\"} 1\n"
        ));
        // Cumulative buckets: 3 ms falls in le=0.005 and above, 30 ms in le=0.05.
        assert!(out.contains("_bucket{le=\"0.0025\"} 0\n"), "{out}");
        assert!(out.contains("_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("_bucket{le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("_bucket{le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("attestation_verification_duration_seconds_count 3\n"));
        assert!(out.contains("attestation_verification_duration_seconds_sum 10.033\n"));
    }
}
