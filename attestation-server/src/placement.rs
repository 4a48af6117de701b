//! Placement audit: a scheduler reports each placement decision (allow or
//! deny per candidate host, with the verdict it relied on) and the server
//! stores one CADF event per decision, so operators can prove workloads
//! only ran on trusted hosts.

use crate::api::{valid_host, Body, Caller};
use crate::audit;
use crate::error::Error;
use crate::tls::Role;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use proto::wire::Trust;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Most decisions one report may carry.
pub const MAX_DECISIONS: usize = 10_000;
const MAX_WORKLOAD_LEN: usize = 512;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementReport {
    /// The workload placed (e.g. `namespace/pod` or an instance id).
    pub workload: String,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    pub host: String,
    pub allowed: bool,
    /// The trust the scheduler relied on.
    pub trust: Trust,
    #[serde(default)]
    pub verified_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub recorded: usize,
}

/// `POST /v1/placements` (scheduler role).
pub async fn report(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Body(r): Body<PlacementReport>,
) -> Result<Json<Recorded>, Error> {
    caller.require(&[Role::Scheduler], "report placements")?;
    if r.workload.is_empty()
        || r.workload.len() > MAX_WORKLOAD_LEN
        || r.workload.chars().any(char::is_control)
    {
        return Err(Error::BadBody(format!(
            "workload must be 1-{MAX_WORKLOAD_LEN} printable characters"
        )));
    }
    if r.decisions.len() > MAX_DECISIONS {
        return Err(Error::TooMany {
            what: "decisions",
            count: r.decisions.len(),
            max: MAX_DECISIONS,
        });
    }
    for d in &r.decisions {
        valid_host(&d.host)?;
    }
    let now = Utc::now();
    let workload = format!("workload?value={}", r.workload);
    for d in &r.decisions {
        let ev = audit::event(
            &st.config.name,
            audit::client(caller.0.role.as_str(), &caller.0.name),
            proto::cadf::Resource::host(&d.host),
            if d.allowed { "allow" } else { "deny" },
            "success",
            None,
            now,
            Some(&d.host),
        );
        let trust = format!("trust?value={}", d.trust.as_str());
        let verified = d
            .verified_at
            .map(|t| format!("verified_at?value={}", proto::cadf::timestamp(t)));
        let mut tags = vec!["placement", workload.as_str(), trust.as_str()];
        if let Some(v) = verified.as_deref() {
            tags.push(v);
        }
        st.store.record_event(&audit::with_tags(ev, &tags)).await?;
    }
    st.audit_wake.notify_one();
    Ok(Json(Recorded {
        recorded: r.decisions.len(),
    }))
}
