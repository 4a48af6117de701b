//! The audit trail's background tasks (one deliverer per sink, the
//! checkpoint signer, the trust scanner, retention) and the middleware that
//! audits requests refused for their credentials.

use super::sinks::{self, Deliverer};
use crate::error::Error;
use crate::tls::Peer;
use crate::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use chrono::Utc;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Start every audit task on `set`; each stops when its `shutdown()` resolves.
pub fn spawn<F, S>(state: &Arc<AppState>, set: &mut JoinSet<()>, shutdown: S) -> Result<(), Error>
where
    S: Fn() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let cfg = &state.config.audit;
    let sinks = sinks::build(cfg, state.config.audit_file.as_ref(), &state.config.name)?;
    // One wake-up from the handlers reaches every deliverer.
    let wakes: Vec<Arc<Notify>> = sinks.iter().map(|_| Arc::new(Notify::new())).collect();
    for ((name, sink), wake) in sinks.into_iter().zip(wakes.iter().cloned()) {
        let d = Deliverer {
            name,
            sink,
            store: state.store.clone(),
            wake,
            board: state.audit_board.clone(),
            min_backoff: Duration::from_millis(cfg.min_backoff_ms),
            max_backoff: Duration::from_secs(cfg.max_backoff_secs),
        };
        set.spawn(d.run(shutdown()));
    }
    set.spawn(fan_out(state.audit_wake.clone(), wakes, shutdown()));
    let key_path = state.config.token_key.clone().or_else(|| cfg.key.clone());
    match key_path {
        Some(p) => {
            let key = super::chain::SigningKey::load(&p)?;
            set.spawn(checkpoints(state.clone(), key, shutdown()));
        }
        None => tracing::warn!(
            "neither token_key nor audit.key is configured: the audit chain is kept but its checkpoints are not signed"
        ),
    }
    set.spawn(trust_scanner(state.clone(), shutdown()));
    if cfg.retention_days > 0 {
        set.spawn(retention(state.clone(), shutdown()));
    }
    Ok(())
}

async fn fan_out(wake: Arc<Notify>, targets: Vec<Arc<Notify>>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = wake.notified() => targets.iter().for_each(|t| t.notify_one()),
        }
    }
}

/// Sign the chain every `checkpoint_every` events or `checkpoint_secs`.
async fn checkpoints(
    state: Arc<AppState>,
    key: super::chain::SigningKey,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let cfg = &state.config.audit;
    let server = state.config.name.clone();
    let mut last_signed = Instant::now();
    loop {
        let stopping = tokio::select! {
            _ = &mut shutdown => true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let result = async {
            let Some(head) = state.store.chain_head(&server).await? else {
                return Ok::<_, Error>(());
            };
            let last = state.store.last_checkpoint(&server).await?;
            let since = head.count - last.as_ref().map_or(0, |c| c.count);
            let due = since >= cfg.checkpoint_every as i64
                || (since > 0
                    && (stopping
                        || last_signed.elapsed() >= Duration::from_secs(cfg.checkpoint_secs)));
            if due {
                let c = key
                    .checkpoint(&server, head.seq, head.count, &head.hash, Utc::now())
                    .map_err(|e| Error::TlsSetup(format!("signing an audit checkpoint: {e}")))?;
                state.store.insert_checkpoint(&c).await?;
                last_signed = Instant::now();
                tracing::debug!(seq = c.seq, count = c.count, "audit checkpoint signed");
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "audit checkpoint failed");
        }
        if stopping {
            return;
        }
    }
}

/// Notice trust changes nobody submitted: a verdict expiring (fresh →
/// stale), and report every change of a host's trust state once.
async fn trust_scanner(state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let every = Duration::from_secs(state.config.audit.trust_scan_secs);
    loop {
        if let Err(e) = scan_trust(&state).await {
            tracing::warn!(error = %e, "trust scan failed");
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Most changes one transaction of a scan records.
const CHANGES_PER_TRANSACTION: i64 = 1000;

/// One scan: emit a `trust_change` event for each host whose state differs
/// from the one last reported. Returns how many changes were recorded.
///
/// The database finds the changes, and each transaction records up to
/// [`CHANGES_PER_TRANSACTION`] of them: a pool of 100,000 hosts whose
/// verdicts lapse together costs a hundred commits, not 100,000, and
/// nothing is read that did not change.
pub async fn scan_trust(state: &AppState) -> Result<usize, Error> {
    let now = Utc::now();
    let mut recorded = 0;
    // Pages by host name: each page's query starts where the last ended.
    let mut after = String::new();
    loop {
        let found = state
            .store
            .trust_changes(now, &after, CHANGES_PER_TRANSACTION)
            .await?;
        if let Some(last) = found.last() {
            after.clone_from(&last.host);
        }
        let changes: Vec<_> = found
            .into_iter()
            .map(|c| {
                let ev = super::trust_change_event(
                    &state.config.name,
                    &c.host,
                    c.before.as_deref(),
                    &c.state,
                    now,
                );
                (c, ev)
            })
            .collect();
        let done: std::collections::HashSet<String> = state
            .store
            .record_trust_changes(&changes)
            .await?
            .into_iter()
            .collect();
        for (c, _) in changes.iter().filter(|(c, _)| done.contains(&c.host)) {
            tracing::info!(
                host = c.host,
                from = c.before.as_deref().unwrap_or("unknown"),
                to = c.state,
                "trust changed"
            );
        }
        recorded += done.len();
        if !done.is_empty() {
            state.audit_wake.notify_one();
        }
        if (changes.len() as i64) < CHANGES_PER_TRANSACTION {
            return Ok(recorded);
        }
    }
}

/// Prune events older than `retention_days` once every sink has them.
async fn retention(state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        if let Err(e) = prune(&state).await {
            tracing::warn!(error = %e, "audit retention failed");
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}

/// Delete events past retention that every configured sink received.
pub async fn prune(state: &AppState) -> Result<u64, Error> {
    let cfg = &state.config.audit;
    if cfg.retention_days == 0 {
        return Ok(0);
    }
    let mut delivered = i64::MAX;
    for (name, _) in sinks::configured(cfg, state.config.audit_file.as_ref()) {
        delivered = delivered.min(state.store.sink_cursor(name).await?);
    }
    let before = Utc::now() - chrono::Duration::days(cfg.retention_days as i64);
    let n = state.store.prune_events(before, delivered).await?;
    if n > 0 {
        tracing::info!(pruned = n, "audit events past retention pruned");
    }
    Ok(n)
}

/// Most refusal events recorded per second; beyond it they are counted in
/// the log only, so a flood of bad requests cannot flood the audit trail.
const REFUSALS_PER_SECOND: u32 = 50;

/// Rate limiter state of [`audit_refusals`].
#[derive(Debug)]
pub struct RefusalBudget(Mutex<(Instant, u32)>);

impl Default for RefusalBudget {
    fn default() -> Self {
        Self(Mutex::new((Instant::now(), 0)))
    }
}

impl RefusalBudget {
    fn take(&self) -> bool {
        let Ok(mut g) = self.0.lock() else {
            return false;
        };
        if g.0.elapsed() >= Duration::from_secs(1) {
            *g = (Instant::now(), 0);
        }
        g.1 += 1;
        g.1 <= REFUSALS_PER_SECOND
    }
}

/// Middleware: record a CADF event (outcome `failure`) for each request
/// refused for its credentials: 401 (no certificate: `authenticate`) and
/// 403 for a certificate that is unusable, a role that may not do this, or
/// an agent acting for another host.
pub async fn audit_refusals(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path: String = req.uri().path().chars().take(200).collect();
    let peer = req.extensions().get::<Peer>().cloned();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    if status != 401 && status != 403 {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let code = serde_json::from_slice::<proto::wire::ErrorBody>(&bytes)
        .map(|b| b.error.code)
        .unwrap_or_default();
    let action = match code.as_str() {
        "client_certificate_required" | "client_certificate_invalid" | "oat_auth_failed" => {
            Some("authenticate")
        }
        "forbidden" | "host_mismatch" => Some(super::action_of(&method)),
        // Other refusals (an EK certificate, a wrong proof) are audited by their handlers.
        _ => None,
    };
    if let Some(action) = action {
        if st.audit_refusals.take() {
            let who = match &peer {
                Some(Some(Ok(id))) => Some((id.role.as_str(), id.name.as_str())),
                _ => None,
            };
            let ev =
                super::access_denied_event(&st.config.name, who, action, &path, &code, Utc::now());
            match st.store.record_event(&ev).await {
                Ok(()) => st.audit_wake.notify_one(),
                Err(e) => tracing::warn!(error = %e, "recording a refused request failed"),
            }
        } else {
            tracing::warn!(
                path,
                code,
                "refused request not audited: too many refusals this second"
            );
        }
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}
